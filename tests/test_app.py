"""The Gradio app: builds, serves, and its events behave through gradio_client.

Runs on the embedded tiny model when it exists (assets/tiny-vlm), otherwise on a tiny
random Qwen2-VL built in a temp folder (random draft: identical output, low speedup).
"""
import functools
import importlib.util
import os
import re
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from app import AppState, build_demo  # noqa: E402
from app import handlers, plots, render  # noqa: E402
from app.state import Session  # noqa: E402
from specvlm_core import engine, models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
QUESTION = "Describe this image."
FAST = dict(max_new_tokens=24)  # keeps every comparison well under a second on CPU
# pandas deprecations inside gradio; gr.Warning outside a request is a UserWarning
pytestmark = [pytest.mark.filterwarnings("ignore:::gradio.queueing"),
              pytest.mark.filterwarnings("ignore:::gradio.helpers")]


@pytest.fixture()
def client(server):
    from gradio_client import Client
    return Client(server, verbose=False)


def compare(client, path, question=QUESTION, **settings):
    from gradio_client import handle_file
    settings = {**FAST, **settings}
    media = handle_file(str(path)) if path is not None else None
    result = client.predict(media=media, question=question, api_name="/compare", **settings)
    outputs = [name for name in handlers.COMPARE_OUTPUTS if name != "session"]
    return dict(zip(outputs, result))


# ----------------------------------------------------------------------- the app

def test_demo_builds_with_an_api_name_on_every_event(app_state):
    demo = build_demo(app_state)
    names = [fn.api_name for fn in demo.fns.values()]
    assert all(names), names
    for name in ("compare", "preview", "stop", "tree_round", "model_status", "auto_tree", "benchmark",
                 "benchmark_stop", "train_start", "train_pause", "train_resume", "train_cancel", "train_status",
                 "use_draft"):
        assert name in names
    assert demo._queue.max_size == 32


def test_the_gpu_decorator_wraps_the_comparison(app_state):
    wrapped = []

    def gpu(fn):  # what spaces.GPU does, minus the GPU
        wrapped.append(fn.__name__)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            yield from fn(*args, **kwargs)
        return wrapper

    build_demo(AppState.from_target(app_state.target, app_state.draft, "given", gpu=gpu))
    assert wrapped == ["compare", "auto_tree", "benchmark"]  # the handlers that run the model


def test_compare_on_an_example_image_is_identical_at_temperature_0(client):
    out = compare(client, EXAMPLES / "shapes_96.png", temperature=0)
    summary = out["summary"]
    assert "error" not in summary
    ar, spec = summary["ar"], summary["spec"]
    assert ar["token_ids"] and ar["token_ids"] == spec["token_ids"]
    assert summary["identical"] is True
    assert isinstance(summary["speedup"], float) and summary["speedup"] > 0
    assert spec["tau"] >= 1 and spec["rounds"] >= 1
    # The page shows both texts, the badge and the speedup number.
    assert 'data-identical="true"' in out["speedup"]
    assert re.search(r'data-testid="speedup">\d+\.\d\d×<', out["speedup"])
    assert 'data-testid="ar-text"' in out["ar_text"] and 'class="svlm-tok' in out["spec_text"]
    assert "s wall" in out["ar_metrics"] and "τ" in out["spec_metrics"]
    assert out["tree_plot"]["type"] == "plotly"


def test_draft_tree_of_a_round_after_a_comparison(client):
    out = compare(client, EXAMPLES / "shapes_160.png", question="How many objects are there?")
    rounds = out["summary"]["spec"]["rounds"]
    assert rounds >= 1
    fig, caption = client.predict(rounds, api_name="/tree_round")  # same client = same session
    assert fig["type"] == "plotly" and f"Round {rounds}" in caption


def test_compare_on_an_animated_gif(client):
    out = compare(client, EXAMPLES / "clip_animated.gif", question="What happens in the video?", max_new_tokens=8)
    summary = out["summary"]
    assert "error" not in summary, summary
    assert summary["media"].startswith(("video clip_animated.gif", "image clip_animated.gif"))
    assert summary["identical"] is True


def test_a_question_without_media_is_answered(client):
    out = compare(client, None, question="What is a triangle?", max_new_tokens=8)
    assert out["summary"]["media"] == "no image or video" and out["summary"]["identical"] is True


def test_bad_file_shows_a_message(client, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a picture")
    out = compare(client, bad)
    assert "Cannot read 'broken.png'" in out["summary"]["error"]
    assert "Cannot read" in out["status"] and "Traceback" not in out["status"]
    preview, info = client.predict(__import__("gradio_client").handle_file(str(bad)), 8, api_name="/preview")
    assert preview is None and "Cannot read" in info


def test_empty_question_shows_a_message(client):
    out = compare(client, EXAMPLES / "shapes_96.png", question="   ")
    assert "question is empty" in out["summary"]["error"]
    assert "question is empty" in out["status"]


def test_out_of_range_settings_are_refused_with_a_message(client):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="less than minimum"):  # gradio checks slider ranges itself
        compare(client, EXAMPLES / "shapes_96.png", top_p=0)
    gen = handlers.Handlers(None).compare("x.png", QUESTION, tree_total=1000, session=Session())
    assert "tree total_tokens must be" in next(gen)[0]["error"]  # and the core checks the rest


# ---------------------------------------------------------------- handlers direct

def test_stopping_a_run_releases_the_model(app_state):
    gen = handlers.Handlers(app_state).compare(str(EXAMPLES / "shapes_96.png"), QUESTION, max_new_tokens=2048,
                                               session=Session())
    next(gen)  # the first live update: the worker holds the model
    gen.close()  # what gradio does on Stop or when the tab closes
    assert app_state.lock.acquire(timeout=20), "the worker did not stop"
    app_state.lock.release()


def test_a_second_run_waits_for_the_model_then_completes(app_state):
    gen = handlers.Handlers(app_state).compare(str(EXAMPLES / "shapes_96.png"), QUESTION, max_new_tokens=4,
                                               session=Session())
    with app_state.lock:  # another session's run holds the model
        status = next(gen)[handlers.COMPARE_OUTPUTS.index("status")]
        assert "Waiting for another user's run" in status
    final = list(gen)[-1][0]
    assert final["identical"] is True


def test_video_on_an_image_only_model_shows_a_message(family_target):
    state = AppState.from_target(family_target("llava"))
    updates = list(handlers.Handlers(state).compare(str(EXAMPLES / "clip_8_frames.mp4"), "What happens?",
                                                    max_new_tokens=4, session=Session()))
    summary = updates[-1][0]
    assert "do not take video" in summary["error"]


def test_app_py_refuses_4bit_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("app_main", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--load-in-4bit", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: 4-bit/8-bit loading needs a CUDA GPU")
    assert module.main(["--model", "./no/such/model", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: model folder not found: ./no/such/model"
    assert module.main(["--model", str(ROOT / "assets"), "--draft", "./no/such/draft", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: draft folder not found: ./no/such/draft"


def test_load_options_are_checked_in_one_place(tmp_path):
    from specvlm_core.errors import ModelLoadError
    from app.state import LoadOptions
    for options, message in (
            (dict(load_in_8bit=True), "4-bit/8-bit loading needs a CUDA GPU"),
            (dict(model=str(tmp_path / "missing")), f"model folder not found: {tmp_path / 'missing'}"),
            (dict(model=str(tmp_path), draft=str(tmp_path / "nodraft")),
             f"draft folder not found: {tmp_path / 'nodraft'}")):
        opts = dict(dict(model=None, device="cpu", load_in_4bit=False, load_in_8bit=False, draft=None), **options)
        with pytest.raises(ModelLoadError) as core:
            models.check_load_options(opts.pop("model"), **opts)
        assert str(core.value).startswith(message)
        with pytest.raises(ModelLoadError) as app_check:  # the app's precheck says the same
            AppState(LoadOptions(device="cpu", **options)).precheck()
        assert str(app_check.value) == str(core.value)
    with pytest.raises(ModelLoadError, match="model folder not found"):  # and so does load_target
        models.load_target(str(tmp_path / "missing"), device="cpu")
    assert models.check_load_options(str(tmp_path), "cpu").type == "cpu"


# ------------------------------------------------------------ pure render / plots

def _event(round_no, tokens, accepted, bonus, tree=None, text=""):
    return engine.RoundEvent("spec", round_no, tokens, text, text, 0, 0.1, tree=tree, accepted_nodes=accepted,
                             bonus_token=bonus)


def test_token_pieces_join_to_the_text_and_mark_bonus_tokens():
    vocab = {1: "a", 2: "b", 3: "\u00e9"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    events = [_event(0, [1], [], None), _event(1, [2, 3, 1], [0, 4, 5], 1), _event(2, [2], [0], 2)]
    pieces = render.token_pieces(events, decode)
    assert "".join(p.text for p in pieces) == "ab\u00e9ab"
    assert [p.kind for p in pieces] == ["prefill", "accepted", "accepted", "bonus", "bonus"]
    html = render.spec_text_html(pieces)
    assert html.count("svlm-bonus") == 2 and "round 1" in html


def test_token_pieces_recut_when_a_character_completes_later():
    # Token 1 alone decodes to a placeholder that token 2 turns into one character.
    decode = lambda ids: {(1,): "\ufffd", (1, 2): "\u00e9", (1, 2, 3): "\u00e9x"}[tuple(ids)]  # noqa: E731
    pieces = render.token_pieces([_event(0, [1], [], None), _event(1, [2, 3], [0, 1], 3)], decode)
    assert "".join(p.text for p in pieces) == "\u00e9x"


def test_tree_figure_highlights_the_accepted_path_and_bonus():
    tree = {"tokens": [5, 6, 7, 8, 9], "parents": [-1, 0, 0, 1, 1], "depths": [0, 1, 1, 2, 2],
            "scores": [0.0, -0.1, -2.0, -0.5, -3.0]}
    event = _event(1, [6, 8, 4], [0, 1, 3], 4, tree=tree)
    fig = plots.tree_figure(event, decode=lambda ids: f"t{ids[0]}")
    x, y = plots.tree_layout(tree["parents"])
    assert x == [0, 1, 1, 2, 2] and y[1] == (y[3] + y[4]) / 2
    texts = [t for trace in fig.data for t in (trace.text or [])]
    assert "t8 -0.50" in texts and "t4 (bonus)" in texts
    widths = [trace.line.width for trace in fig.data if trace.mode == "lines"]
    assert 4 in widths  # the accepted path
    assert plots.accepted_length_figure([event]).data[0].y == (2,)
    ar = [engine.RoundEvent("ar", i, [1], "", "", i + 1, 0.1 * (i + 1)) for i in range(3)]
    spec = [engine.RoundEvent("spec", 0, [1], "", "", 1, 0.1), engine.RoundEvent("spec", 1, [1, 1], "", "", 3, 0.15)]
    assert plots.speedup_series(ar, spec) == ([0.1, 0.15], [1.0, pytest.approx(2.0)])
    assert plots.speedup_figure(ar, spec).data
