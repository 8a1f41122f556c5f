"""The Train, Benchmark and Compressor tabs (and Compare's auto tree and compressor
modes) through gradio_client, on the embedded model when it exists, else a tiny random
Qwen2-VL (random draft: identical output, low speedup).

Training writes under a temporary runs/ folder; the auto-tree cache goes to a
temporary file.
"""
import csv
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from app import AppState  # noqa: E402
from app import handlers, tasks, training  # noqa: E402
from specvlm_core import autotune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
QUESTION = "Describe this image."
pytestmark = [pytest.mark.filterwarnings("ignore:::gradio.queueing"),
              pytest.mark.filterwarnings("ignore:::gradio.helpers")]


@pytest.fixture(scope="module")
def app_state(app_target, tmp_path_factory):
    state = AppState.from_target(app_target)
    state.runs_dir = tmp_path_factory.mktemp("runs")
    state.auto_tree.samples = 1  # one calibration prompt keeps the measurement short
    mp = pytest.MonkeyPatch()
    mp.setattr(autotune, "CACHE_PATH", tmp_path_factory.mktemp("cache") / "autotree.json")
    yield state
    job = state.training.job
    if job is not None and job.running:
        job.cancel()
        job.wait(30)
    mp.undo()


def new_client(url):
    from gradio_client import Client
    return Client(url, verbose=False)


@pytest.fixture()
def client(server):
    return new_client(server)


def compare(client, path=EXAMPLES / "shapes_160.png", question=QUESTION, **settings):
    from gradio_client import handle_file
    settings = {"max_new_tokens": 16, **settings}
    result = client.predict(media=handle_file(str(path)), question=question, api_name="/compare", **settings)
    return dict(zip([n for n in handlers.COMPARE_OUTPUTS if n != "session"], result))


# ------------------------------------------------------------------- compressor

def test_prune_guided_shows_the_compressor_info_and_the_kept_cells(client, app_state):
    from PIL import Image
    shared = app_state.draft.compressor
    out = compare(client, compressor="prune_guided:4")
    summary = out["summary"]
    assert "error" not in summary and summary["identical"] is True  # an untrained compressor stays lossless
    assert summary["compressor"] == "prune_guided:4"
    info = out["compressor_info"]
    assert "`prune_guided`" in info and "untrained" in info and "lossless" in info
    before, after = map(int, re.search(r"visual tokens before → after \| (\d+) → (\d+)", info).groups())
    assert after == -(-before // 4)  # ceil(n / 4) tokens kept
    assert "draft prefill" in info and re.search(r"\d+\.\d ms", info)
    assert out["gate_plot"]["type"] == "plotly"
    overlay = Image.open(out["overlay"])  # the grid over the input, kept cells shaded
    assert overlay.width > 100 and overlay.height > 100
    assert app_state.draft.compressor is shared  # the shared draft was never changed


def test_gate_probabilities_and_compressor_off(client):
    out = compare(client, compressor="select")
    assert out["summary"]["identical"] is True
    plot = json.loads(out["gate_plot"]["plot"])
    bars = plot["data"][0]
    assert bars["type"] == "bar" and len(bars["x"]) == 9 and abs(sum(bars["y"]) - 1) < 0.01
    assert "mode `select`" in out["compressor_info"]

    out = compare(client, compressor="off")
    assert out["summary"]["identical"] is True
    assert "**off**" in out["compressor_info"] and out["overlay"] is None


def test_an_unknown_compressor_mode_is_refused(app_state):
    gen = handlers.Handlers(app_state).compare(str(EXAMPLES / "shapes_96.png"), QUESTION, compressor="zip:9")
    assert "unknown compressor mode 'zip:9'" in next(gen)[0]["error"]


def test_compressor_modes_never_change_the_shared_draft(app_state):
    draft = app_state.draft
    before = draft.compressor
    assert tasks.compressor_for_mode(draft, None, app_state.compressors) == ("draft", "as trained")
    assert tasks.compressor_for_mode(draft, "off", app_state.compressors) == (None, "off")
    comp, note = tasks.compressor_for_mode(draft, "pool:4", app_state.compressors)
    again, _ = tasks.compressor_for_mode(draft, "pool:4", app_state.compressors)
    assert note == "untrained" and comp is again  # built once, same weights
    assert draft.compressor is before


# ------------------------------------------------------------- auto tree, bench

def test_auto_tree_button_then_compare_uses_it(client):
    info, checkbox, top_k, depth, total = client.predict(False, api_name="/auto_tree")
    assert info.startswith("**Auto tree:**") and "Why:" in info and "expected tau" in info
    chosen = {"top_k": top_k["value"], "depth": depth["value"], "total_tokens": total["value"]}
    assert "measured" in checkbox["label"]
    out = compare(client, tree_auto=True, tree_top_k=1, tree_depth=1, tree_total=1)
    assert out["summary"]["identical"] is True
    assert out["summary"]["tree"] == chosen and out["summary"]["tree_auto"] is True


def test_quick_benchmark(client):
    status, table, plot, json_file, csv_file = client.predict("quick", 8, 1, "fixed", 4, 6, 16, api_name="/benchmark")
    assert 'data-testid="bench-done"' in status
    assert "| Method |" in table and "| specvlm | 0 |" in table and "| plain | 0 |" in table
    figure = json.loads(plot["plot"])
    assert {trace["name"] for trace in figure["data"]} >= {"eagle", "specvlm"}
    report = json.loads(Path(json_file).read_text())
    assert report["lossless"] is True and len(report["conditions"]["cases"]) == 4
    assert report["conditions"]["max_new_tokens"] == 8
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} >= {"plain", "specvlm"} and all(r["case"] for r in rows)


def test_benchmark_settings_are_checked():
    h = handlers.Handlers(None)  # checked before the model is touched
    assert "unknown suite &#x27;huge&#x27;" in next(h.benchmark("huge", 8, 1, "fixed", 4, 6, 16))[0]
    assert "repeats must be between 1 and 10" in next(h.benchmark("quick", 8, 0, "fixed", 4, 6, 16))[0]
    assert "tree depth must be" in next(h.benchmark("quick", 8, 1, "fixed", 4, 60, 16))[0]


# ------------------------------------------------------------------------ train

def train_status(client) -> tuple[str, int, str]:
    html = client.predict(api_name="/train_status")[0]
    m = re.search(r'data-state="(\w+)" data-step="(\d+)"', html)
    return (m.group(1), int(m.group(2)), html) if m else ("none", 0, html)


def wait_for(client, predicate, timeout=40.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, step, html = train_status(client)
        if predicate(state, step):
            return state, step
        time.sleep(0.1)
    raise AssertionError(f"timed out; last status: {html}")


def test_train_pause_resume_cancel_then_use_a_checkpoint(server, app_state):
    owner, other = new_client(server), new_client(server)
    out = owner.predict(steps=5000, batch_size=2, eval_every=4, eval_samples=1, checkpoint_every=3,
                        out_name="ui run", api_name="/train_start")
    assert "started: generated world → runs/ui_run" in out[0]
    assert out[-1]["active"] is True  # the timer polls while the job runs
    wait_for(owner, lambda s, step: step >= 2)

    # One job at a time, and only its session controls it.
    busy = other.predict(steps=5, out_name="second", api_name="/train_start")[0]
    assert "a training job is already running" in busy and "another session" in busy
    assert "started in another browser session" in other.predict(api_name="/train_pause")[0]

    owner.predict(api_name="/train_pause")
    _, paused_at = wait_for(owner, lambda s, step: s == "paused")
    time.sleep(0.4)
    assert train_status(owner)[:2] == ("paused", paused_at)
    owner.predict(api_name="/train_resume")
    wait_for(owner, lambda s, step: s == "running" and step >= paused_at + 2)
    wait_for(owner, lambda s, step: step >= 4)  # one evaluation (tau) done
    owner.predict(api_name="/train_cancel")
    state, step = wait_for(owner, lambda s, step: s in ("cancelled", "finished", "failed"))
    assert state == "cancelled"

    html, plot, table, dropdown, timer = owner.predict(api_name="/train_tab")  # everything, in full
    figure = json.loads(plot["plot"])
    tau_trace = figure["data"][3]
    assert len(figure["data"][0]["x"]) == step and tau_trace["y"] and tau_trace["y"][0] >= 1
    kinds = [row[1] for row in table["data"]]
    assert kinds[0] == "final" and "checkpoint" in kinds and timer["active"] is False
    shown = next(row[3] for row in table["data"] if row[1] == "checkpoint")
    assert shown.startswith("runs/ui_run/checkpoints/step-")
    checkpoint = next(value for _, value in dropdown["choices"] if value.endswith(shown[len("runs"):]))

    # Use a checkpoint: Compare runs with it at once, still lossless.
    message, model_status = owner.predict(checkpoint, api_name="/use_draft")
    assert "Compare now uses **ui_run/step-" in message and "step-" in model_status
    assert app_state.draft_source == checkpoint
    out = compare(owner, max_new_tokens=8)
    assert out["summary"]["identical"] is True
    assert "choose a draft from the list" in owner.predict("/etc", api_name="/use_draft")[0]

    # The folder is taken now; Resume continues it from its last checkpoint.
    taken = owner.predict(steps=5, out_name="ui run", api_name="/train_start")[0]
    assert "already holds a training run" in taken
    last = max(int(row[2]) for row in table["data"] if row[1] == "checkpoint")
    owner.predict(steps=last + 1, out_name="ui run", resume=True, eval_samples=0, api_name="/train_start")
    assert wait_for(owner, lambda s, step: s in ("finished", "failed", "cancelled")) == ("finished", last + 1)

    message, _ = owner.predict("startup", api_name="/use_draft")
    assert "Compare now uses" in message and app_state.draft is app_state.startup_draft


def test_comparisons_while_a_draft_trains_stay_correct(server, app_state):
    trainer, user = new_client(server), new_client(server)
    reference = compare(user, max_new_tokens=12)["summary"]["spec"]["token_ids"]
    trainer.predict(steps=5000, batch_size=2, eval_every=2, eval_samples=1, checkpoint_every=1000,
                    out_name="busy", api_name="/train_start")
    try:
        wait_for(trainer, lambda s, step: step >= 1)
        for mode in ("off", "prune_guided:4", "off"):  # the job's forwards interleave with these runs
            summary = compare(user, max_new_tokens=12, compressor=mode)["summary"]
            assert "error" not in summary and summary["identical"] is True
            assert summary["spec"]["token_ids"] == reference
        state, step = wait_for(trainer, lambda s, step: step >= 3)
        assert state == "running" and app_state.training.job.error is None
    finally:
        trainer.predict(api_name="/train_cancel")
        wait_for(trainer, lambda s, step: s in ("cancelled", "finished", "failed"))
    assert app_state.training.job.status()["state"] == "cancelled"


def test_train_on_an_uploaded_llava_json(client, app_state, tmp_path):
    from gradio_client import handle_file
    conv = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A few coloured shapes."}]
    records = [{"image": "shapes one.png", "conversations": conv},
               {"image": "nested/dir/shapes one.png", "conversations": conv},  # found by its file name
               {"image": "../../../etc/passwd", "conversations": conv}]  # outside the media folder: skipped
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(records))
    media = tmp_path / "shapes one.png"
    shutil.copyfile(EXAMPLES / "shapes_96.png", media)
    out = client.predict(source="uploaded LLaVA JSON", data_json=handle_file(str(data)),
                         media_files=[handle_file(str(media))], steps=3, batch_size=2, eval_samples=0,
                         checkpoint_every=3, out_name="../uploaded", api_name="/train_start")
    assert "3 records, 1 media files uploaded, 2 of 3 media references found" in out[0]
    assert "runs/uploaded" in out[0]  # the name lost its path part
    assert wait_for(client, lambda s, step: s in ("finished", "failed", "cancelled"))[0] == "finished"
    job = app_state.training.job
    staged = Path(job.config.data)
    assert Path(job.config.media_dir, "shapes_one.png").is_file()  # a sanitised name
    assert [r["image"] for r in json.loads(staged.read_text())] == ["shapes_one.png", "shapes_one.png",
                                                                    "../../../etc/passwd"]
    out_dir = Path(job.config.out_dir)
    assert out_dir.parent == app_state.runs_folder() and (out_dir / "draft.safetensors").is_file()
    skipped = json.loads((out_dir / "skipped_records.json").read_text())
    assert any("outside the media folder" in reason for reason in skipped)


def test_train_start_refuses_bad_input(client):
    missing = client.predict(source="uploaded LLaVA JSON", steps=3, out_name="nojson", api_name="/train_start")[0]
    assert "upload a LLaVA-format JSON file" in missing
    assert "give the output folder a name" in client.predict(out_name="../..", api_name="/train_start")[0]
    assert "nothing to resume" in client.predict(out_name="fresh", resume=True, api_name="/train_start")[0]


def test_file_and_folder_names_are_sanitised(tmp_path):
    assert training.safe_filename("../../etc/passwd") == "passwd"
    assert training.safe_filename("..") == "file" and training.safe_filename(".bashrc") == "bashrc"
    assert training.safe_filename("C:\\temp\\a b?.png") == "a_b_.png"
    assert training.run_folder(tmp_path, "../x") == (tmp_path / "x").resolve()
    with pytest.raises(Exception, match="give the output folder a name"):
        training.run_folder(tmp_path, "/")


def test_a_training_forward_waits_for_the_generation_lock():
    lock, calls = threading.Lock(), []

    class Model:
        config = "cfg"

        def __call__(self, x):
            calls.append(x)
            return x

    model = training.LockedModel(Model(), lock)
    assert model.config == "cfg"
    with lock:  # a comparison holds the model
        worker = threading.Thread(target=model, args=(1,))
        worker.start()
        worker.join(0.3)
        assert calls == [] and worker.is_alive()
    worker.join(5)
    assert calls == [1]
