"""tiny-train end to end on a few steps (both phases run, log, and write a loadable model) and the quality metrics."""
import json

import torch

from specvlm_core import tiny_vlm


def test_tiny_train_runs_both_phases_and_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "tiny"
    metrics = tiny_vlm.train_tiny_vlm(str(out), minutes=0.5, vision_minutes=0.05, max_steps=2, batch_size=2,
                                      vision_batch_size=2, video_share=0.5, log_every=1, progress=False,
                                      eval_scenes=2, eval_clips=1)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    vision, joint = [e for e in log if e.get("phase") == "vision"], [e for e in log if "loss" in e]
    assert vision and all(e["aux_loss"] > 0 and e["kind"] == "image" for e in vision)  # the vision phase: stills
    assert [e["step"] for e in joint] == [1, 2] and metrics["train_steps"] == 2
    config = json.loads((out / "train_config.json").read_text())
    assert config["vision_minutes"] == 0.05 and config["video_share"] == 0.5
    assert 0.0 <= metrics["describe_all_objects"] <= 1.0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert AutoProcessor.from_pretrained(out).chat_template
    # The model card's command reproduces this run's settings, whatever the CLI defaults are.
    card = tiny_vlm.write_model_card(out).read_text()
    assert "--minutes 0.5 --vision-minutes 0.05 --lr 0.0015 --video-share 0.5 --batch-size 2 --seed 0`" in card


def test_quality_metrics_split_counts_by_question_kind(monkeypatch):
    """A model that counts every object right and never answers a one-colour count scores
    1 and 0 on the two count splits, and their weighted mean is the overall count accuracy."""
    from specvlm_core import world

    def fake_answers(model, processor, samples, **kwargs):
        return ["" if any(f"many {c} " in s.question for c in world.COLOURS) else s.answer for s in samples]
    monkeypatch.setattr(tiny_vlm, "greedy_answers", fake_answers)
    m = tiny_vlm.evaluate_quality(torch.nn.Identity(), None, n_scenes=40, n_clips=2)
    assert m["count_accuracy_all_objects"] == 1.0 and m["count_accuracy_one_colour"] == 0.0
    assert 0.0 < m["count_accuracy"] < 1.0 and m["describe_all_objects"] == 1.0 and m["motion_accuracy"] == 1.0
