"""Online distillation: short runs on tiny random targets, checkpoints, resume, jobs."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specvlm_core import distill, engine, testing
from specvlm_core.draft import EagleDraft
from specvlm_core.errors import DraftMismatchError, SpecVLMError

ROOT = Path(__file__).resolve().parent.parent


def quick_config(tmp_path, **kw):
    base = dict(steps=4, batch_size=2, checkpoint_every=2, eval_every=2, eval_samples=2,
                eval_max_new_tokens=6, out_dir=str(tmp_path / "run"), warmup_steps=2)
    base.update(kw)
    return distill.DistillConfig(**base)


def test_short_run_writes_a_loadable_draft_and_metrics(family_target, tmp_path):
    target = family_target("qwen2_vl")
    metrics = []
    cfg = quick_config(tmp_path, json_log=str(tmp_path / "log.jsonl"))
    out = distill.train(cfg, target=target, on_metrics=metrics.append, show_bar=False)
    assert (out / "draft.safetensors").is_file() and (out / "draft_config.json").is_file()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert all(k in m for k in ("loss", "loss_logit", "loss_feat", "top1", "epoch", "lr"))
        assert torch.isfinite(torch.tensor(m["loss"]))
    assert "tau" in metrics[1] and metrics[1]["tau"] >= 1.0
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["step"] == 4
    draft = EagleDraft.from_pretrained(out, target=target)
    # The distilled draft plugs into the engine and stays lossless.
    inputs = engine_inputs(target)
    ref = target.model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:]
    res = engine.collect(engine.speculative_stream(target, engine.EagleDrafter(draft, target), inputs,
                                                   engine.SamplingSettings(max_new_tokens=12), engine.TreeSettings()))
    assert res.token_ids == ref.tolist()


def engine_inputs(target):
    from specvlm_core.models import prepare_inputs
    return prepare_inputs(target, "Describe the image.", image=testing.tiny_image((64, 64), 3))


def test_teacher_loss_mask_covers_answer_predictions_only(family_target):
    target = family_target("qwen2_vl")
    ex = distill.Example("How many objects are there?", "There are two objects.",
                         image=testing.tiny_image((64, 64), 1))
    out = distill.teacher_forward(target, ex)
    n_answer = len(target.tokenizer.encode("There are two objects.", add_special_tokens=False)) + 1  # + end of turn
    seq = out.features.shape[0]
    # Position p is trained iff token p+2 is an answer token: the first answer token
    # comes from the target's prefill, so one fewer position than answer tokens.
    assert out.loss_mask.shape[0] == seq - 1
    assert int(out.loss_mask.sum()) == n_answer - 1
    # The last trained position predicts the end-of-turn token (the template's newline
    # after it is not trained).
    assert models_text(target, ex).endswith("<|im_end|>\n")
    eos_pos = seq - 2
    assert int(out.loss_mask.nonzero().max()) == eos_pos - 2
    assert out.visual_mask.sum() > 0 and out.embeds.shape == out.features.shape


def models_text(target, ex):
    from specvlm_core.models import build_training_text
    return build_training_text(target, ex.prompt, ex.answer, "image")[0]


def test_resume_continues_from_the_last_checkpoint(family_target, tmp_path):
    target = family_target("qwen2_vl")
    distill.train(quick_config(tmp_path, steps=4, eval_samples=0), target=target, show_bar=False)
    assert [p.name for p in distill.list_checkpoints(tmp_path / "run")] == ["step-0000002", "step-0000004"]
    # A write killed half-way leaves only a hidden temporary folder: ignored.
    (tmp_path / "run" / "checkpoints" / ".step-0000006.tmp").mkdir()
    metrics = []
    distill.train(quick_config(tmp_path, steps=6, eval_samples=0, resume=True), target=target,
                  on_metrics=metrics.append, show_bar=False)
    assert [m["step"] for m in metrics] == [5, 6]
    state = distill.load_trainer_state(distill.list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 6 and "state" in state["optimizer"]


def test_llava_json_data_skips_and_counts_bad_records(family_target, tmp_path):
    target = family_target("qwen2_vl")
    media = tmp_path / "media"
    media.mkdir()
    testing.tiny_image((64, 48), 1).save(media / "a.png")
    (media / "broken.png").write_bytes(b"not an image")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                {"from": "gpt", "value": "A red circle."}]}
    records = [good, {"image": "missing.png", "conversations": good["conversations"]},
               {"image": "broken.png", "conversations": good["conversations"]},
               {"image": "../../etc/passwd", "conversations": good["conversations"]},
               {"conversations": [{"from": "human", "value": "hi"}]}, "not a dict",
               {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    cfg = quick_config(tmp_path, data=str(data), media_dir=str(media), steps=3, eval_samples=0)
    out = distill.train(cfg, target=target, show_bar=False)
    skipped = json.loads((out / "skipped_records.json").read_text())
    assert sum(skipped.values()) >= 5
    assert any("outside the media folder" in k for k in skipped)


def test_background_job_pause_resume_cancel(family_target, tmp_path):
    target = family_target("qwen2_vl")
    job = distill.DistillJob(quick_config(tmp_path, steps=10_000, eval_samples=0, checkpoint_every=3),
                             target=target).start()
    deadline = time.time() + 60
    while len(job.metrics) < 2 and time.time() < deadline:
        time.sleep(0.05)
    job.pause()
    time.sleep(0.5)
    assert job.status()["state"] == "paused"
    paused_at = len(job.metrics)
    time.sleep(0.5)
    assert len(job.metrics) <= paused_at + 1  # at most the step in flight finishes
    job.resume()
    while len(job.metrics) < paused_at + 4 and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job.wait(60)
    status = job.status()
    assert status["state"] == "cancelled" and status["step"] >= paused_at + 3
    assert job.draft_dir() == str(tmp_path / "run")
    assert job.checkpoints(), "checkpoints every 3 steps"


def test_a_full_disk_is_reported_and_keeps_the_previous_checkpoint(family_target, tmp_path, monkeypatch):
    target = family_target("qwen2_vl")
    distill.train(quick_config(tmp_path, steps=2, eval_samples=0), target=target, show_bar=False)
    before = distill.list_checkpoints(tmp_path / "run")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(distill.torch, "save", no_space)
    with pytest.raises(SpecVLMError, match="No space left on device"):
        distill.train(quick_config(tmp_path, steps=4, eval_samples=0, resume=True), target=target, show_bar=False)
    monkeypatch.undo()
    assert distill.list_checkpoints(tmp_path / "run") == before
    assert distill.load_trainer_state(before[-1])["step"] == 2


def test_a_draft_for_another_target_is_refused(family_target, tmp_path):
    qwen, llava = family_target("qwen2_vl"), family_target("llava")
    out = distill.train(quick_config(tmp_path, steps=1, eval_samples=0), target=qwen, show_bar=False)
    with pytest.raises(DraftMismatchError, match="trained for"):
        EagleDraft.from_pretrained(out, target=llava)


@pytest.mark.parametrize("family", testing.FAMILIES_UNDER_TEST)
def test_every_family_distils(family_target, tmp_path, family):
    target = family_target(family)
    metrics = []
    distill.train(quick_config(tmp_path, steps=2, eval_samples=0), target=target, on_metrics=metrics.append,
                  show_bar=False)
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)


def test_sigkill_during_training_leaves_a_resumable_checkpoint(tmp_path):
    model = testing.build_tiny_target("qwen2_vl", tmp_path / "model")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "specvlm_core", "distill", "--model", model, "--steps", "400",
           "--batch-size", "1", "--checkpoint-every", "1", "--eval-samples", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(distill.list_checkpoints(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.137)  # land somewhere inside a later checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = distill.list_checkpoints(out)
    assert ckpts, "at least one complete checkpoint survives"
    last_step = distill.load_trainer_state(ckpts[-1])["step"]
    resumed = subprocess.run(cmd[:7] + [str(last_step + 1)] + cmd[8:] + ["--resume"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert distill.load_trainer_state(distill.list_checkpoints(out)[-1])["step"] == last_step + 1
    assert (out / "draft.safetensors").is_file()


def test_gate_learns_towards_the_measured_best_option(family_target):
    """The select gate's target is argmin(draft loss under the option + lambda x prefill ms),
    measured under every option; training on it moves the gate's choice there."""
    from specvlm_core import compressor as C
    from specvlm_core.draft import new_draft_for
    target = family_target("qwen2_vl")
    draft = new_draft_for(target)
    draft.compressor = C.VisualCompressor(draft.config.hidden_size, mode="select", explore=0.0)
    ex = distill.Example("Describe the image.", "A red circle.", image=testing.tiny_image((96, 96), 2))
    out = distill.teacher_forward(target, ex)
    lm_head = target.model.get_output_embeddings()
    term = distill.gate_regret_loss(draft, lm_head, out, draft.compressor)
    n = int(out.visual_mask[1:].sum())
    grid = C.grid_for(n, out.media.get("grid"))
    assert term["option_losses"].shape == (len(draft.compressor.options),)
    assert torch.isfinite(term["option_losses"]).all() and torch.isfinite(term["loss"])
    assert term["target"] == draft.compressor.best_option(term["option_losses"], n, grid)
    # A huge cost per token makes the cheapest option (text only) the target.
    draft.compressor.lambda_cost = 1e6
    cheap = distill.gate_regret_loss(draft, lm_head, out, draft.compressor)["target"]
    assert str(draft.compressor.options[cheap]) == "text_only:0"
    # A few gate-only steps on that target make it the gate's choice.
    opt = torch.optim.Adam(draft.compressor.gate.parameters(), lr=1e-2)
    for _ in range(30):
        loss = distill.gate_regret_loss(draft, lm_head, out, draft.compressor)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, _, info = draft.compressor.compress_sequence(out.embeds[1:], out.features[:-1], out.visual_mask[1:], out.media)
    assert info["primitive"] == "text_only"


def test_distillation_with_a_select_compressor_logs_the_gate_loss(family_target, tmp_path):
    target = family_target("qwen2_vl")
    metrics = []
    cfg = quick_config(tmp_path, steps=2, eval_every=0, compressor={"mode": "select"})
    distill.train(cfg, target=target, on_metrics=metrics.append, show_bar=False)
    assert all("loss_gate" in m and m["loss_gate"] >= 0 for m in metrics)
    with pytest.raises(SpecVLMError):
        distill.DistillConfig(gate_supervision="vibes").validate()
