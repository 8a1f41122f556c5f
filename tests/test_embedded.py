"""The shipped model and draft: offline loading, visual-token scaling, lossless
decoding with the trained draft, and the quality metrics of the model card."""
import json
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from specvlm_core import api, engine, tiny_vlm, world
from specvlm_core.draft import EagleDraft
from specvlm_core.models import DEFAULT_DRAFT, DEFAULT_MODEL, prepare_inputs


def test_stock_transformers_loads_the_embedded_model_offline():
    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL)
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    assert model.config.model_type == "qwen2_vl" and model.config.text_config.num_hidden_layers >= 8
    assert "<|image_pad|>" in processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_shipped_model_was_trained_with_the_code_defaults():
    """The training script and the shipped weights must describe the same model: a changed
    TINY_CONFIG (for example the clip frame size) needs a retrained checkpoint."""
    folder = Path(DEFAULT_MODEL)
    trained = json.loads((folder / "train_config.json").read_text())["tiny_config"]
    assert trained == json.loads(json.dumps(tiny_vlm.TINY_CONFIG))
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    images, videos = processor.image_processor.size, processor.video_processor.size
    # Stills are upscaled to a higher floor at inference than in training (see INFERENCE_IMAGE_MIN_PIXELS).
    assert (images["shortest_edge"], images["longest_edge"]) == \
        (tiny_vlm.INFERENCE_IMAGE_MIN_PIXELS, tiny_vlm.TINY_CONFIG["image_pixels"][1])
    assert (videos["shortest_edge"], videos["longest_edge"]) == tuple(tiny_vlm.TINY_CONFIG["video_pixels"])


def visual_tokens(target, **media):
    ids = prepare_inputs(target, "Describe it.", **media)["input_ids"][0]
    return int(engine.visual_mask(target, {"input_ids": ids[None]}).sum())


def test_visual_tokens_grow_with_resolution_and_frames(embedded_target):
    sizes = [visual_tokens(embedded_target, image=world.render([], s, s)) for s in (96, 160, 224)]
    assert sizes[0] < sizes[1] < sizes[2]
    # Below the inference floor (128x128 px) a still is upscaled: 64 tokens, as at 128 px.
    assert visual_tokens(embedded_target, image=world.render([], 64, 64)) == sizes[0] == 64
    frames = [visual_tokens(embedded_target, video=[world.render([], 96, 96)] * n) for n in (4, 8, 16)]
    assert frames[0] < frames[1] < frames[2]


def test_the_shipped_draft_belongs_to_the_shipped_model(embedded_target):
    draft, source = api.load_draft(embedded_target)
    assert source == DEFAULT_DRAFT and draft.compressor is not None
    assert draft.config.target_hidden_size == embedded_target.hidden_size


CASES = [("image", 0, 96, (4, 6, 16)), ("image", 1, 224, (8, 7, 48)), ("image", 2, 384, (2, 4, 8)),
         ("video", 3, None, (4, 6, 16)), ("video", 4, None, (10, 8, 64)), ("image", 5, 160, (1, 1, 1))]


@pytest.mark.parametrize("kind,seed,size,tree", CASES)
def test_trained_draft_is_lossless_and_accepts_many_tokens(embedded_target, kind, seed, size, tree):
    smp = world.make_sample(world.EVAL_SEED + 300 + seed, kind=kind, task="describe",
                            size_range=(size, size) if size else (64, 384))
    media = {"image": smp.frames[0]} if kind == "image" else {"video": smp.frames}
    inputs = prepare_inputs(embedded_target, smp.question, **media)
    ref = embedded_target.model.generate(**inputs, do_sample=False, max_new_tokens=48)
    ref = ref[0, inputs["input_ids"].shape[1]:].tolist()
    draft = EagleDraft.from_pretrained(DEFAULT_DRAFT, target=embedded_target)
    res = engine.collect(engine.speculative_stream(embedded_target, engine.EagleDrafter(draft, embedded_target),
                                                   inputs, engine.SamplingSettings(max_new_tokens=48),
                                                   engine.TreeSettings(*tree), media=media))
    assert res.token_ids == ref
    if tree[1] >= 4:
        assert res.mean_accepted > 2.5  # a trained draft, not a random one


def test_answers_are_well_formed(embedded_target):
    """What the model does reliably today: every answer follows the world's grammar."""
    samples = [world.make_sample(world.EVAL_SEED + 400 + i, kind="image", task="count") for i in range(6)]
    answers = tiny_vlm.greedy_answers(embedded_target.model, embedded_target.processor, samples, max_new_tokens=96)
    for a in answers:
        assert a.startswith("I see ") and a.endswith(".") and world.stated_count(a) in world.NUMBER_WORDS


@pytest.mark.xfail(strict=True, reason="quality targets not met by this checkpoint yet: see assets/tiny-vlm/README.md")
def test_quality_targets_on_a_held_out_sample(embedded_target):
    m = tiny_vlm.evaluate_quality(embedded_target.model, embedded_target.processor, n_scenes=12, n_clips=6)
    assert m["describe_all_objects"] >= 0.9 and m["count_accuracy"] >= 0.85 and m["motion_accuracy"] >= 0.8
