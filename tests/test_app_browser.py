"""The app in a real browser: Debian's chromium driven by Playwright (no browser download).

Skips when the `playwright` package or /usr/bin/chromium is missing. With SCREENSHOTS=1
it also writes the README screenshots into docs/screenshots/.
"""
import io
import os
import re
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from apphelpers import serve  # noqa: E402
from app import AppState, build_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SCREENSHOT_DIR = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000
MODEL_READY = re.compile(r"^Model:")  # the status line once loaded (case-sensitive, unlike plain text)

pytestmark = [pytest.mark.filterwarnings("ignore:::gradio.queueing")]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def studio_state(app_target, tmp_path_factory):
    state = AppState.from_target(app_target)
    state.runs_dir = tmp_path_factory.mktemp("runs")  # Train writes here, not into ./runs
    return state


@pytest.fixture(scope="module")
def server(studio_state, browser):
    demo = build_demo(studio_state)
    yield serve(demo)
    demo.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.locator("#model-status").get_by_text(MODEL_READY).wait_for()
    yield page
    context.close()


def run_compare(page, path: Path, question: str) -> None:
    page.locator("#media-input input[type=file]").set_input_files(str(path))
    page.locator("#question textarea").fill(question)
    page.locator("#run-btn").click()


def test_compare_in_the_browser_then_a_bad_file(page, tmp_path):
    # A run: both outputs, the speedup, the badge.
    run_compare(page, EXAMPLES / "shapes_160.png", "How many objects are there?")
    page.locator("#speedup [data-testid=identical]").wait_for()
    assert page.locator("#speedup [data-testid=identical]").get_attribute("data-identical") == "true"
    assert re.fullmatch(r"\d+\.\d\d×", page.locator("#speedup [data-testid=speedup]").inner_text().strip())
    assert page.locator("#ar-output [data-testid=ar-text]").inner_text().strip()
    assert page.locator("#spec-output .svlm-tok").count() > 0
    assert "tok/s" in page.locator("#ar-metrics").inner_text()
    assert "τ" in page.locator("#spec-metrics").inner_text()
    assert page.locator("#media-preview img").count() == 1

    # The draft tree of round 1 renders as a plotly chart.
    page.get_by_role("tab", name="Draft trees").click()
    tree = page.locator("#tree-plot .js-plotly-plot")
    tree.wait_for()
    assert "Round 1" in tree.inner_text()
    assert page.locator("#accepted-plot .js-plotly-plot").count() == 1
    if os.environ.get("SCREENSHOTS") == "1":
        take_screenshots(page)

    # A file that is not an image: a message in the page, no traceback.
    page.get_by_role("tab", name="Compare").click()
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"definitely not a PNG")
    page.locator("#media-input button[aria-label='Clear']").first.click()
    run_compare(page, bad, "What is this?")
    error = page.locator("#status [data-testid=error]")
    error.wait_for()
    assert "Cannot read 'holiday.png'" in error.inner_text()
    assert "Cannot read" in page.locator("#media-info").inner_text()
    assert "Traceback" not in page.content()


def test_an_example_video_run_can_be_stopped_and_run_again(page, studio_state):
    page.get_by_text("Settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("512")
    tokens.press("Enter")
    page.get_by_text("clip_8_frames.mp4 — What happens in the video?").click()  # an example: a video
    page.locator("#media-info").get_by_text("video clip_8_frames.mp4").wait_for()
    assert page.locator("#question textarea").input_value() == "What happens in the video?"
    # The embedded model answers this clip in under a second, so a Stop could arrive after
    # the run ended: hold the model as another user's run would, so the run is surely
    # still going (waiting for the model) when Stop is pressed.
    with studio_state.lock:
        page.locator("#run-btn").click()
        page.locator("#status").get_by_text("Waiting for another user's run").wait_for()
        page.locator("#stop-btn").click()
        page.locator("#status").get_by_text("Stopped").wait_for()
    tokens.fill("8")
    tokens.press("Enter")
    page.locator("#run-btn").click()  # the stopped run released its place
    try:
        page.locator("#status").get_by_text("Done").wait_for()
    except Exception as exc:  # say where the re-run stuck
        raise AssertionError(f"the re-run did not finish; status: {page.locator('#status').inner_text()!r}, "
                             f"max tokens: {tokens.input_value()!r}") from exc


def test_the_compressor_tab_shows_what_was_kept(page):
    page.get_by_text("Settings").click()
    page.locator("#compressor-mode input").click()
    page.get_by_role("option", name="prune_guided:4").click()
    run_compare(page, EXAMPLES / "shapes_160.png", "How many objects are there?")
    page.locator("#speedup [data-testid=identical]").wait_for()
    assert page.locator("#speedup [data-testid=identical]").get_attribute("data-identical") == "true"
    page.get_by_role("tab", name="Compressor").click()
    page.locator("#compressor-info").get_by_text("prune_guided").first.wait_for()
    assert "untrained" in page.locator("#compressor-info").inner_text()
    page.locator("#compressor-overlay img").wait_for()
    page.locator("#gate-plot .js-plotly-plot").wait_for()


def test_train_a_draft_then_use_it(page):
    page.get_by_role("tab", name="Train").click()
    steps = page.locator("#train-steps input[type=number]")
    steps.fill("6")
    steps.press("Enter")
    page.locator("#train-out textarea, #train-out input").first.fill("browser-run")
    page.locator("#train-start").click()
    # Only the timer brings the job's progress to the page.
    page.locator('#train-status [data-state="finished"]').wait_for()
    assert "step 6/6" in page.locator("#train-status").inner_text()
    page.locator("#train-plot .js-plotly-plot").wait_for()
    page.locator("#train-drafts").get_by_text("final").first.wait_for()
    page.locator("#use-draft").click()
    page.locator("#use-draft-info").get_by_text("Compare now uses").wait_for()
    assert "browser-run" in page.locator("#use-draft-info").inner_text()
    assert "draft browser-run" in page.locator("#model-status").inner_text()


def test_the_page_shows_the_model_loading(browser, app_target):
    from app import LoadOptions
    state = AppState(LoadOptions(model=app_target.name, device="cpu", warmup=False))
    demo = build_demo(state)
    url = serve(demo)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#model-status").get_by_text("Loading the model").wait_for()
        state.start_loading()
        page.locator("#model-status").get_by_text(MODEL_READY).wait_for()  # the timer picked it up
        assert state.ready
    finally:
        context.close()
        demo.close()


# ------------------------------------------------------------------ screenshots

def save_png(png: bytes, path: Path, max_bytes: int = 300_000) -> None:
    """Write a screenshot as a palette PNG (a fraction of the size), halving the scale
    until it fits max_bytes."""
    from PIL import Image
    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buf = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or image.width < 400:
            break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def take_screenshots(page, out_dir: Path = SCREENSHOT_DIR) -> list[Path]:
    """README screenshots of a page that has just finished a comparison: the Compare
    tab and the Draft trees tab (left selected on return)."""
    paths = []
    page.get_by_role("tab", name="Compare").click()
    page.locator("#speedup [data-testid=identical]").wait_for()
    page.wait_for_timeout(300)
    paths.append(out_dir / "compare.png")
    save_png(page.screenshot(full_page=True), paths[-1])
    page.get_by_role("tab", name="Draft trees").click()
    page.locator("#tree-plot .js-plotly-plot").wait_for()
    page.wait_for_timeout(800)  # let plotly finish its transitions
    paths.append(out_dir / "draft_trees.png")
    save_png(page.screenshot(full_page=True), paths[-1])
    for path in paths:
        assert path.stat().st_size < 300_000, path
    return paths
