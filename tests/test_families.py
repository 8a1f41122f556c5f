"""Every supported target family, built tiny and random, through the paths the engine uses.

Each family is built once per session with testing.build_tiny_target and loaded offline
with models.load_target. The block-verification tests prove that one forward of several
draft tokens, with an explicit 4D float mask and explicit position ids (the conventions
in specvlm_core/testing.py's docstring), gives the logits that token-by-token decoding
and `generate` give: the public-API path that tree verification relies on.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from specvlm_core import models, testing
from specvlm_core.errors import InputError

PROMPT = "What is in the picture?"
# Family name load_target reports: Qwen2.5-VL shares Qwen2-VL's M-RoPE scheme.
REPORTED_FAMILY = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "llava": "llava",
                   "llava_onevision": "llava_onevision"}
VIDEO_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "llava_onevision"}
# LLaVA-1.5 centre-crops every image to 32 px and has 8 px patches: always 4x4 tokens.
LLAVA_IMAGE_TOKENS = 16
LOGITS_ATOL = 1e-4


@dataclass
class BuiltFamily:
    family: str  # the name passed to build_tiny_target, e.g. "qwen2_5_vl"
    folder: Path
    target: models.Target


@pytest.fixture(scope="session", params=testing.FAMILIES_UNDER_TEST)
def built(request, tmp_path_factory) -> BuiltFamily:
    family = request.param
    folder = testing.build_tiny_target(family, tmp_path_factory.mktemp(family))
    return BuiltFamily(family, Path(folder), models.load_target(folder, device="cpu"))


def prompt_inputs(target: models.Target, media: str, size=(64, 48), n_frames: int = 4) -> dict:
    """Processor outputs for PROMPT with one deterministic image or clip."""
    if media == "image":
        return models.prepare_inputs(target, PROMPT, image=testing.tiny_image(size, seed=1))
    return models.prepare_inputs(target, PROMPT, video=testing.tiny_clip(n_frames, size, seed=2))


def placeholder_count(target: models.Target, inputs: dict, media: str) -> int:
    token_id = getattr(target.processor, f"{media}_token_id")
    return int((inputs["input_ids"] == token_id).sum())


def skip_unless_video(built: BuiltFamily, media: str):
    if media == "video" and built.family not in VIDEO_FAMILIES:
        pytest.skip(f"{built.family} takes no video")


def verification_mask(past_len: int, ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, q, past_len + q] float mask: 0 where a query attends, finfo.min where not.

    Every block token sees the whole cached prompt and the block tokens marked in
    ancestors ([q, q] bool, row = query, the token itself included).
    """
    q = ancestors.shape[0]
    mask = torch.zeros(1, 1, q, past_len + q, dtype=dtype)
    mask[0, 0, :, past_len:].masked_fill_(~ancestors, torch.finfo(dtype).min)
    return mask


def verification_positions(target: models.Target, past_len: int, depths: torch.Tensor) -> torch.Tensor:
    """Position ids of block tokens at depths [q] (0 = right after the prompt).

    [3, 1, q] for the M-RoPE families: a text token has one position on all three axes,
    shifted by the rope_deltas the prefill stored on the inner model. [1, q] otherwise.
    """
    positions = (past_len + depths).view(1, -1)
    if target.family == "qwen2_vl":
        return (positions + target.model.model.rope_deltas).unsqueeze(0).expand(3, -1, -1)
    return positions


def block_logits(target: models.Target, inputs: dict, tokens: torch.Tensor, ancestors: torch.Tensor,
                 depths: torch.Tensor, position_shift: int = 0) -> torch.Tensor:
    """[1, q, V] logits of tokens [1, q] fed in one forward after a fresh prefill.

    position_shift offsets every position id, for checking that wrong ids are caught.
    """
    prefill = target.model(**inputs, use_cache=True)
    past_len = prefill.past_key_values.get_seq_length()
    return target.model(input_ids=tokens, past_key_values=prefill.past_key_values, use_cache=True,
                        attention_mask=verification_mask(past_len, ancestors, target.dtype),
                        position_ids=verification_positions(target, past_len, depths) + position_shift,
                        ).logits


def sequential_logits(target: models.Target, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """[1, n, V] logits after each of tokens [1, n], fed one at a time with the normal
    API (no mask, no position ids) after a fresh prefill."""
    cache = target.model(**inputs, use_cache=True).past_key_values
    steps = [target.model(input_ids=tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1]
             for i in range(tokens.shape[1])]
    return torch.stack(steps, dim=1)


# --------------------------------------------------------------------- the builder

def test_folder_is_small_and_safetensors(built):
    files = {p.name: p.stat().st_size for p in built.folder.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    assert sum(files.values()) < 2 * 1024 * 1024


def test_build_is_deterministic_in_the_seed(tmp_path):
    def weights(folder):
        return (Path(folder) / "model.safetensors").read_bytes()
    first = weights(testing.build_tiny_target("llava", tmp_path / "a", seed=3))
    assert weights(testing.build_tiny_target("llava", tmp_path / "b", seed=3)) == first
    assert weights(testing.build_tiny_target("llava", tmp_path / "c", seed=4)) != first


def test_media_helpers_are_deterministic():
    assert testing.tiny_image((40, 30), seed=5).size == (40, 30)
    assert testing.tiny_image((40, 30), seed=5).tobytes() == testing.tiny_image((40, 30), seed=5).tobytes()
    clip = testing.tiny_clip(4, (48, 32), seed=6)
    assert len(clip) == 4 and all(frame.size == (48, 32) for frame in clip)
    assert [f.tobytes() for f in clip] == [f.tobytes() for f in testing.tiny_clip(4, (48, 32), seed=6)]


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        testing.build_tiny_target("gpt2", tmp_path)


# ------------------------------------------------------------- loading and inputs

def test_load_target_offline_reports_the_family(built):
    assert built.target.model.config.model_type == built.family
    assert built.target.family == REPORTED_FAMILY[built.family]
    assert built.target.supports_video == (built.family in VIDEO_FAMILIES)


def test_eos_and_pad_ids_agree_everywhere(built):
    target = built.target
    eos_id = target.tokenizer.eos_token_id
    assert target.eos_token_ids() == [eos_id]
    pad_id = target.tokenizer.pad_token_id
    assert pad_id is not None and pad_id != eos_id
    for config in (target.model.config, target.text_config, target.model.generation_config):
        assert config.pad_token_id == pad_id


@pytest.mark.parametrize("media", ["image", "video"])
def test_generate_runs(built, media):
    skip_unless_video(built, media)
    inputs = prompt_inputs(built.target, media)
    prompt_len = inputs["input_ids"].shape[1]
    out = built.target.model.generate(**inputs, do_sample=False, max_new_tokens=5)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert 1 <= out.shape[1] - prompt_len <= 5


def test_video_is_refused_by_image_only_families(built):
    if built.family in VIDEO_FAMILIES:
        pytest.skip(f"{built.family} takes video")
    with pytest.raises(InputError, match="do not take video"):
        prompt_inputs(built.target, "video")


def test_image_placeholders_follow_resolution(built):
    counts = [placeholder_count(built.target, prompt_inputs(built.target, "image", size=size), "image")
              for size in [(32, 32), (64, 48), (128, 128)]]
    if built.family == "llava":
        assert counts == [LLAVA_IMAGE_TOKENS] * 3  # fixed crop: resolution does not matter
    else:
        assert counts[0] < counts[1] < counts[2]


def test_video_placeholders_grow_with_frames(built):
    skip_unless_video(built, "video")
    counts = [placeholder_count(built.target, prompt_inputs(built.target, "video", n_frames=n), "video")
              for n in (2, 4, 8)]
    assert counts[0] < counts[1] < counts[2]


# ------------------------------------------------------------- block verification

@pytest.mark.parametrize("media", ["image", "video"])
def test_chain_block_matches_sequential_decoding_and_generate(built, media):
    skip_unless_video(built, media)
    target = built.target
    inputs = prompt_inputs(target, media)
    prompt_len = inputs["input_ids"].shape[1]
    # min_new_tokens keeps a random model from stopping early; logits are the raw ones.
    generated = target.model.generate(**inputs, do_sample=False, max_new_tokens=4, min_new_tokens=4,
                                      output_logits=True, return_dict_in_generate=True)
    draft = generated.sequences[:, prompt_len:prompt_len + 3]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    depths = torch.arange(3)

    block = block_logits(target, inputs, draft, causal, depths)

    sequential = sequential_logits(target, inputs, draft)
    torch.testing.assert_close(block, sequential, atol=LOGITS_ATOL, rtol=0)
    # generate's step k+1 logits come after feeding generated token k.
    torch.testing.assert_close(block, torch.stack(generated.logits[1:], dim=1), atol=LOGITS_ATOL, rtol=0)
    # The check has teeth: positions off by one move the logits far beyond the tolerance.
    shifted = block_logits(target, inputs, draft, causal, depths, position_shift=1)
    assert (shifted - sequential).abs().max() > 100 * LOGITS_ATOL
    if target.family == "qwen2_vl":
        # The visual grid makes rope_deltas non-zero, so leaving it out would be caught too.
        assert int(target.model.model.rope_deltas.abs().min()) >= 1


def test_branching_block_matches_each_branch_decoded_alone(built):
    """A tree of three draft tokens: a root and two sibling children at the same depth."""
    target = built.target
    inputs = prompt_inputs(target, "image")
    root, left, right = target.tokenizer.encode(" red blue green", add_special_tokens=False)[:3]
    tokens = torch.tensor([[root, left, right]])
    ancestors = torch.tensor([[1, 0, 0],
                              [1, 1, 0],
                              [1, 0, 1]], dtype=torch.bool)
    depths = torch.tensor([0, 1, 1])

    block = block_logits(target, inputs, tokens, ancestors, depths)

    left_path = sequential_logits(target, inputs, torch.tensor([[root, left]]))
    right_path = sequential_logits(target, inputs, torch.tensor([[root, right]]))
    torch.testing.assert_close(block[:, :2], left_path, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(block[:, 2], right_path[:, 1], atol=LOGITS_ATOL, rtol=0)
