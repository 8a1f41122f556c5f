"""Tiny, randomly initialised target models of every supported family, for tests.

`build_tiny_target(family, out_dir)` writes a folder (config, generation config,
safetensors weights, processor, tokenizer) that `models.load_target(out_dir)` loads
offline, exactly as it loads a real Hub checkpoint of that family. Each folder is a
few hundred kB and builds in well under a second, so tests can cover every family
the engine claims to support without network access or a GPU.

| family          | model class                            | real checkpoint it mimics                  |
|-----------------|----------------------------------------|--------------------------------------------|
| qwen2_vl        | Qwen2VLForConditionalGeneration        | Qwen/Qwen2-VL-2B-Instruct                  |
| qwen2_5_vl      | Qwen2_5_VLForConditionalGeneration     | Qwen/Qwen2.5-VL-3B-Instruct                |
| llava           | LlavaForConditionalGeneration          | llava-hf/llava-1.5-7b-hf                   |
| llava_onevision | LlavaOnevisionForConditionalGeneration | llava-hf/llava-onevision-qwen2-0.5b-ov-hf  |

`tiny_image(size, seed)` and `tiny_clip(n_frames, size, seed)` give deterministic
inputs from the shapes world to feed them.

Conventions for verifying a block of q draft tokens through the public forward API
(checked per family by tests/test_families.py against token-by-token decoding and
against `generate`), after a prefill forward of the prompt with `use_cache=True`:

- attention_mask: a 4D float tensor [B, 1, q, past_len + q] in the model's dtype,
  0.0 where a query may attend and torch.finfo(dtype).min where it may not; it is
  passed through unchanged to the sdpa kernels (all four families).
- position_ids, Qwen2-VL and Qwen2.5-VL (M-RoPE): [3, B, q] =
  past_len + arange(q) + model.model.rope_deltas. rope_deltas ([B, 1], usually <= 0
  because a grid of visual tokens spans fewer positions than it has tokens) is set
  on the inner model (`model.model`, not the ForConditionalGeneration wrapper) by
  the prefill forward, which therefore must get `mm_token_type_ids` and the grid
  sizes from the processor. Text tokens use the same position on all three axes.
  `load_target` reports both as family "qwen2_vl".
- position_ids, LLaVA-1.5 and LLaVA-OneVision (1D RoPE): [B, q] = past_len + arange(q).

Visual token counts: Qwen2-VL/2.5-VL and LLaVA-OneVision (anyres tiling) give more
placeholder tokens to larger images, and more to longer clips. LLaVA-1.5 resizes and
centre-crops every image to a fixed crop, so its count is always
(crop_size / patch_size)^2 = 16 here, whatever the resolution; it takes no video.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from . import tiny_vlm, world

FAMILIES_UNDER_TEST = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision")

# One text decoder size for every family: 2 layers, 64 wide, 4 query / 2 KV heads
# (head_dim 16), so grouped-query attention is exercised as in the real models.
TEXT_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
# Init std of the text decoders. At the usual 0.02 attention is almost uniform, so a
# wrong position id or mask entry moves the logits by < 1e-3; at 0.1 it moves them by
# 0.05-0.5 while float32 rounding stays ~1e-6, so logit comparisons tell right from wrong.
TEXT_INIT_STD = 0.1

# Qwen2-VL with 8 px patches and 2x2 merging: one visual token per 16x16 px, so images
# of 32..128 px get 4..64 tokens. mrope_section sums to head_dim / 2 = 8.
QWEN_TINY_CONFIG = dict(
    vision=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=8,
                spatial_merge_size=2, temporal_patch_size=2),
    text=dict(TEXT_SIZES, rope_theta=10000.0, mrope_section=[2, 3, 3]),
    image_pixels=(32 * 32, 128 * 128),
    video_pixels=(32 * 32, 64 * 64),
)

# LLaVA vision towers see 32x32 px tiles in 8 px patches: 16 patch features per tile.
VISION_TILE_PX = 32
VISION_PATCH_PX = 8
# LLaVA-OneVision tiling grids (height, width) in px: a larger image is split into more
# tiles (up to 3x3), each adding its patch features plus one newline token per row.
ONEVISION_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32],
                            [64, 96], [96, 64], [96, 96]]

# The real llava-1.5-hf template: "USER: <image>\n<text> ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The real llava-onevision-qwen2 template: media tokens, then the text on a new line.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Texts used to fit the tiny BPE: a few hundred samples already give the world's words.
TOKENIZER_TEXTS = 400


def build_tiny_target(family: str, out_dir, seed: int = 0) -> str:
    """Write a tiny randomly initialised `family` model and its processor to out_dir.

    family: one of FAMILIES_UNDER_TEST. The weights depend only on seed; the global
    torch RNG is left as it was. eos and pad ids are the tokenizer's eos/pad tokens in
    the config, the text config and the generation config alike.
    Returns out_dir as a string, ready for `models.load_target`.
    """
    import transformers

    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES_UNDER_TEST}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builder = _BUILDERS[family]
    processor = builder["processor"]()
    config = builder["config"](processor.tokenizer)
    config.text_config.initializer_range = TEXT_INIT_STD
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, builder["model_class"])(config)
    text_config = config.text_config
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def tiny_image(size: tuple[int, int] = (64, 64), seed: int = 0):
    """A deterministic RGB PIL image of the shapes world, size = (width, height)."""
    rng = random.Random(seed)
    objects = world.random_objects(rng, rng.randint(1, 4))
    return world.render(objects, *size, background=rng.choice(world.BACKGROUNDS))


def tiny_clip(n_frames: int = 4, size: tuple[int, int] = (64, 64), seed: int = 0) -> list:
    """A deterministic clip of n_frames RGB PIL frames, size = (width, height)."""
    rng = random.Random(seed)
    per_frame_objects, _events = world.random_clip(rng, n_frames)
    background = rng.choice(world.BACKGROUNDS)
    return [world.render(objects, *size, background=background) for objects in per_frame_objects]


# ----------------------------------------------------------------------- tokenizers

def _tokenizer(**special_tokens):
    """The embedded byte-level BPE (Qwen-style specials included) plus the family's
    own special tokens, e.g. eos_token="</s>", extra_special_tokens=["<image>"]."""
    tokenizer = tiny_vlm.build_tokenizer(n_texts=TOKENIZER_TEXTS)
    if special_tokens:
        tokenizer.add_special_tokens(special_tokens, replace_extra_special_tokens=False)
    return tokenizer


def _token_roles(tokenizer) -> dict:
    """bos/eos/pad ids for a text config, taken from the tokenizer."""
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


# ------------------------------------------------------------------------ qwen2_vl

def _qwen2_vl_processor():
    return tiny_vlm.build_processor(_tokenizer(), QWEN_TINY_CONFIG)


def _qwen2_vl_config(tokenizer):
    return tiny_vlm.build_config(tokenizer, QWEN_TINY_CONFIG)


# ---------------------------------------------------------------------- qwen2_5_vl

def _qwen2_5_vl_processor():
    from transformers import Qwen2_5_VLProcessor

    # Qwen2.5-VL checkpoints ship the Qwen2-VL image and video processors.
    qwen2_processor = tiny_vlm.build_processor(_tokenizer(), QWEN_TINY_CONFIG)
    return Qwen2_5_VLProcessor(image_processor=qwen2_processor.image_processor,
                               tokenizer=qwen2_processor.tokenizer,
                               video_processor=qwen2_processor.video_processor,
                               chat_template=tiny_vlm.CHAT_TEMPLATE)


def _qwen2_5_vl_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    t, v = QWEN_TINY_CONFIG["text"], QWEN_TINY_CONFIG["vision"]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in tiny_vlm.SPECIAL_TOKENS}
    text_config = tiny_vlm.qwen_text_config(tokenizer, t, **_token_roles(tokenizer))
    # Unlike Qwen2-VL, the 2.5 vision tower has a SwiGLU MLP, its own width
    # (hidden_size) projected to the text width (out_hidden_size), and windowed
    # attention except in fullatt_block_indexes. window_size is in px: 32 px = 2x2
    # merged tokens per window, so windowing really happens on the test images.
    vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                         out_hidden_size=t["hidden_size"], patch_size=v["patch_size"],
                         spatial_merge_size=v["spatial_merge_size"],
                         temporal_patch_size=v["temporal_patch_size"],
                         window_size=32, fullatt_block_indexes=[1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
                            **_token_roles(tokenizer))


# --------------------------------------------------------------------------- llava

def _llava_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = _tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                           extra_special_tokens=["<image>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": VISION_TILE_PX},
                                         crop_size={"height": VISION_TILE_PX, "width": VISION_TILE_PX})
    # CLIP prepends a CLS feature that the "default" strategy drops again, hence +1 -1.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=VISION_PATCH_PX, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def _llava_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=VISION_TILE_PX,
                                     patch_size=VISION_PATCH_PX, projection_dim=32)
    text_config = LlamaConfig(vocab_size=len(tokenizer), rms_norm_eps=1e-6, **TEXT_SIZES,
                              **_token_roles(tokenizer))
    return LlavaConfig(vision_config=vision_config, text_config=text_config,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       image_seq_length=(VISION_TILE_PX // VISION_PATCH_PX) ** 2,
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       **_token_roles(tokenizer))


# ----------------------------------------------------------------- llava_onevision

def _llava_onevision_processor():
    from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    tokenizer = _tokenizer(extra_special_tokens=["<image>", "<video>"])
    tile = {"height": VISION_TILE_PX, "width": VISION_TILE_PX}
    image_processor = LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=ONEVISION_GRID_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size=tile)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor,
                                   num_image_tokens=(VISION_TILE_PX // VISION_PATCH_PX) ** 2,
                                   vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9",
                                   chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)


def _llava_onevision_config(tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=VISION_TILE_PX,
                                       patch_size=VISION_PATCH_PX)
    text_config = Qwen2Config(vocab_size=len(tokenizer), rms_norm_eps=1e-6, tie_word_embeddings=True,
                              **TEXT_SIZES, **_token_roles(tokenizer))
    return LlavaOnevisionConfig(vision_config=vision_config, text_config=text_config,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                image_grid_pinpoints=ONEVISION_GRID_PINPOINTS,
                                vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
                                **_token_roles(tokenizer))


_BUILDERS = {
    "qwen2_vl": dict(processor=_qwen2_vl_processor, config=_qwen2_vl_config,
                     model_class="Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": dict(processor=_qwen2_5_vl_processor, config=_qwen2_5_vl_config,
                       model_class="Qwen2_5_VLForConditionalGeneration"),
    "llava": dict(processor=_llava_processor, config=_llava_config,
                  model_class="LlavaForConditionalGeneration"),
    "llava_onevision": dict(processor=_llava_onevision_processor, config=_llava_onevision_config,
                            model_class="LlavaOnevisionForConditionalGeneration"),
}
