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
    assert config["vision_objects"] == list(tiny_vlm.VISION_OBJECTS)
    assert 0.0 <= metrics["describe_all_objects"] <= 1.0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert AutoProcessor.from_pretrained(out).chat_template
    # The model card's command reproduces this run's settings, whatever the CLI defaults are.
    card = tiny_vlm.write_model_card(out).read_text()
    assert "--minutes 0.5 --vision-minutes 0.05 --lr 0.0015 --video-share 0.5 --batch-size 2 --seed 0`" in card
    assert "stills per step of 5-9 objects" in card


def test_quality_metrics_split_counts_by_question_kind(monkeypatch):
    """A model that counts every object right and never answers a one-colour count scores
    1 and 0 on the two count splits, and the overall count accuracy is the share of
    all-object questions."""
    from specvlm_core import world
    asked = []

    def fake_answers(model, processor, samples, **kwargs):
        asked.extend(s for s in samples if s.task == "count")
        return ["" if world.counted_colour(s.question) else s.answer for s in samples]
    monkeypatch.setattr(tiny_vlm, "greedy_answers", fake_answers)
    m = tiny_vlm.evaluate_quality(torch.nn.Identity(), None, n_scenes=40, n_clips=2)
    assert len(asked) == 40
    all_objects = sum(world.counted_colour(s.question) is None for s in asked)
    assert 0 < all_objects < 40  # both kinds are asked
    assert m["count_accuracy_all_objects"] == 1.0 and m["count_accuracy_one_colour"] == 0.0
    assert m["count_accuracy"] == all_objects / 40
    assert m["describe_all_objects"] == 1.0 and m["motion_accuracy"] == 1.0


def test_counted_colour_reads_the_generated_count_questions():
    from specvlm_core import world
    questions = {world.make_sample(world.EVAL_SEED + 10**6 + i, kind="image", task="count").question
                 for i in range(60)}
    colours = {world.counted_colour(q) for q in questions}
    assert None in colours and colours - {None} <= set(world.COLOURS) and len(colours) > 2
    assert world.counted_colour("How many green objects are there?") == "green"
    assert world.counted_colour("How many objects are there?") is None


def test_cli_defaults_are_the_training_functions_defaults():
    """The shipped model was trained with the CLI's defaults; Python callers get the same run."""
    import inspect
    from specvlm_core.cli import build_parser
    args = build_parser().parse_args(["tiny-train", "--out", "x"])
    defaults = inspect.signature(tiny_vlm.train_tiny_vlm).parameters
    for name in ("minutes", "max_steps", "batch_size", "lr", "seed", "eval_scenes", "eval_clips", "aux_weight",
                 "vision_minutes", "vision_lr", "video_share"):
        assert getattr(args, name) == defaults[name].default, name
