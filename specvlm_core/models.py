"""Loading target VLMs and turning (media, prompt) into model inputs.

One code path for the embedded tiny Qwen2-VL and for real checkpoints on the Hub
(`llava-hf/llava-1.5-7b-hf`, `llava-hf/llava-onevision-qwen2-0.5b-ov-hf`,
`Qwen/Qwen2-VL-2B-Instruct`, ...): AutoModelForImageTextToText + AutoProcessor, with
`trust_remote_code` off unless asked for.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(ROOT / "assets" / "tiny-vlm")
DEFAULT_DRAFT = str(ROOT / "assets" / "tiny-vlm-draft")

# model_type -> family name used by the engine.
FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",  # same M-RoPE position scheme
    "llava": "llava",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "llava_next_video": "llava_next",
}
VIDEO_FAMILIES = {"qwen2_vl", "llava_onevision"}


@dataclass
class Target:
    """A loaded target VLM: the model (eval mode, frozen), its processor and facts the
    engine needs about it."""
    model: torch.nn.Module
    processor: object
    name: str
    family: str

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 32768) or 32768)

    @property
    def supports_video(self) -> bool:
        return self.family in VIDEO_FAMILIES

    def eos_token_ids(self) -> list[int]:
        """Every id that ends a turn: generation_config's, config's and the tokenizer's."""
        ids = []
        for src in (getattr(self.model, "generation_config", None), self.text_config, self.model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is None:
                continue
            ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.append(tok_eos)
        return sorted(set(int(i) for i in ids))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was requested but no GPU is available; use --device cpu")
    return torch.device(device)


QUANTIZED_NEEDS_CUDA = ("4-bit/8-bit loading needs a CUDA GPU (bitsandbytes); drop "
                        "--load-in-4bit/--load-in-8bit to run on the CPU")


def looks_local(name: str) -> bool:
    """Whether a model name is a local path rather than a Hub name ("org/model")."""
    return name.startswith((".", "/", "~")) or os.sep in name and not name.count("/") == 1


def check_load_options(name: str | None, device: str = "auto", load_in_4bit: bool = False,
                       load_in_8bit: bool = False, draft: str | None = None) -> torch.device:
    """Fail fast, before anything is loaded, on options that cannot work here: a GPU
    that is not there, 4/8-bit weights without CUDA, a model (or draft) folder that
    does not exist. The one place for these messages (load_target and the app's
    precheck both call it). Returns the resolved device; raises ModelLoadError."""
    dev = resolve_device(device)
    if (load_in_4bit or load_in_8bit) and dev.type != "cuda":
        raise ModelLoadError(QUANTIZED_NEEDS_CUDA)
    name = name or DEFAULT_MODEL
    if looks_local(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"model folder not found: {name}")
    if draft and not Path(draft).expanduser().is_dir():
        raise ModelLoadError(f"draft folder not found: {draft}")
    return dev


def load_target(name_or_path: str | None = None, device: str = "auto", dtype: str | torch.dtype | None = None,
                load_in_4bit: bool = False, load_in_8bit: bool = False,
                trust_remote_code: bool = False) -> Target:
    """Load a VLM and its processor by Hub name or local folder.

    dtype None picks float32 on CPU and bfloat16/float16 on GPU. Tree verification needs a
    4D float mask, which the sdpa and eager attention paths accept, so flash attention is
    not requested.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    name = name_or_path or DEFAULT_MODEL
    dev = check_load_options(name, device, load_in_4bit, load_in_8bit)
    if trust_remote_code:
        log.warning("trust_remote_code is on: code from %s will run on this machine", name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache: download it once with "
                "network access, or pass a local folder") if offline else \
            "check the name, your network, or pass a local folder"
        raise ModelLoadError(f"cannot load model {name!r}: {hint}") from exc
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelLoadError(f"{name!r} is a {config.model_type!r} model; supported families: "
                             + ", ".join(sorted(set(FAMILIES))))
    if dtype is None:
        torch_dtype = torch.float32 if dev.type == "cpu" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    if load_in_4bit or load_in_8bit:  # check_load_options made sure this is a CUDA device
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
        kwargs["device_map"] = {"": dev.index or 0}
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    if "quantization_config" not in kwargs:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return Target(model=model, processor=processor, name=name, family=family)


def build_messages(prompt: str, media_kind: str | None) -> list[dict]:
    content = []
    if media_kind is not None:
        content.append({"type": media_kind})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def prepare_inputs(target: Target, prompt: str, image=None, video=None) -> dict:
    """Processor outputs for one chat turn, on the target's device.

    image: an RGB PIL image; video: a list of RGB PIL frames. Returns the processor's
    tensors: input_ids [1, S], attention_mask [1, S], and pixel values with grid sizes
    (the exact keys depend on the family).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    if video is not None and not target.supports_video:
        raise InputError(f"{target.family} models do not take video; give an image instead")
    kind = "image" if image is not None else ("video" if video is not None else None)
    proc = target.processor
    text = proc.apply_chat_template(build_messages(prompt, kind), add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if image is not None:
        kwargs["images"] = [image]
    if video is not None:
        kwargs["videos"] = [list(video)]
        kwargs["do_sample_frames"] = False
    batch = proc(text=[text], return_tensors="pt", **kwargs)
    n_tokens = batch["input_ids"].shape[1]
    if n_tokens >= target.context_length:
        raise InputError(f"the prompt with its media is {n_tokens} tokens, more than the model's context of "
                         f"{target.context_length}; shorten the question or use fewer frames / a smaller image")
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(target.device)
            if v.is_floating_point():
                v = v.to(target.dtype)
        out[k] = v
    return out


@contextlib.contextmanager
def record_decoder_io(model):
    """Within the block, every forward of `model` run by *this thread* records (never
    changes) what its language model receives and returns:
    record["embeds"]: inputs_embeds [B, S, H] (visual positions hold the projected
    visual features), record["features"]: final hidden states [B, S, H] after the final
    norm, i.e. exactly what the lm_head reads.
    Plain torch forward hooks, no modeling code copied or patched. The hooks ignore
    other threads' forwards, so requests sharing one model never see each other's
    tensors."""
    decoder = model.get_decoder()
    record: dict = {}
    owner = threading.get_ident()

    def grab_inputs(_module, _args, kwargs):
        if threading.get_ident() == owner:
            record["embeds"] = kwargs.get("inputs_embeds")

    def grab_outputs(_module, _args, _kwargs, output):
        if threading.get_ident() == owner:
            record["features"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handles = [decoder.register_forward_pre_hook(grab_inputs, with_kwargs=True),
               decoder.register_forward_hook(grab_outputs, with_kwargs=True)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def build_training_text(target: Target, prompt: str, answer: str, media_kind: str | None) -> tuple[str, str]:
    """(full chat text with the answer and end of turn, the prompt part alone).
    The answer's tokens are those after the prompt part."""
    proc = target.processor
    prompt_text = proc.apply_chat_template(build_messages(prompt, media_kind), add_generation_prompt=True,
                                           tokenize=False)
    messages = build_messages(prompt, media_kind) + [{"role": "assistant",
                                                      "content": [{"type": "text", "text": answer}]}]
    full = proc.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt_text):  # templates that render the assistant turn differently
        eos = target.tokenizer.eos_token or ""
        full = prompt_text + answer + eos
    return full, prompt_text
