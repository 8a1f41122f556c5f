"""The Python API the CLI and the app share: load a target and its draft, run plain and
speculative decoding on one (media, prompt), and summarise the result."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import engine
from .draft import EagleDraft, new_draft_for
from .models import DEFAULT_DRAFT, DEFAULT_MODEL, Target, prepare_inputs

log = logging.getLogger(__name__)


def load_draft(target: Target, draft_path: str | None = None) -> tuple[EagleDraft, str]:
    """The draft for a target: draft_path if given; for the embedded model its shipped
    draft; otherwise a randomly initialised one (lossless, only slower).
    Returns (draft, description of where it came from)."""
    if draft_path:
        return EagleDraft.from_pretrained(draft_path, target=target), str(draft_path)
    if Path(target.name).resolve() == Path(DEFAULT_MODEL).resolve() and Path(DEFAULT_DRAFT).is_dir():
        return EagleDraft.from_pretrained(DEFAULT_DRAFT, target=target), DEFAULT_DRAFT
    log.warning("no trained draft for %s: using a random draft (output stays identical, speedup is low)",
                target.name)
    return new_draft_for(target), "random"


def result_summary(result: engine.GenerationResult | None) -> dict | None:
    if result is None:
        return None
    out = {"text": result.text, "token_ids": result.token_ids, "seconds": round(result.seconds, 4),
           "new_tokens": result.new_tokens, "prefill_ms": round(result.prefill_ms, 2),
           "finish_reason": result.finish_reason}
    if result.method == "spec":
        out["mean_accepted"] = result.mean_accepted
        out["rounds"] = result.rounds
    return out


def run_generation(target: Target, draft: EagleDraft | None, prompt: str, image=None, video=None,
                   mode: str = "both", sampling: engine.SamplingSettings | None = None,
                   tree: engine.TreeSettings | None = None, inputs: dict | None = None) -> dict:
    """Run "ar", "spec" or "both" on one input; returns the CLI's JSON contract:
    {"ar": {...}|None, "spec": {...}|None, "identical": bool|None, "speedup": float|None}.
    identical compares token ids and is reported at any temperature (at T>0 both runs
    use the same seed but are only equal in distribution). inputs: the already
    prepared model inputs of (prompt, media), if the caller has them."""
    sampling = sampling or engine.SamplingSettings()
    tree = tree or engine.TreeSettings()
    sampling.validate()
    tree.validate()
    if inputs is None:
        inputs = prepare_inputs(target, prompt, image=image, video=video)
    room = target.context_length - inputs["input_ids"].shape[1]
    if sampling.max_new_tokens > room:  # documented: the answer is cut at the context's end
        log.warning("max_new_tokens %d exceeds the room left in the context; using %d", sampling.max_new_tokens, room)
        sampling = engine.SamplingSettings(**{**vars(sampling), "max_new_tokens": room})
    ar = spec = None
    if mode in ("ar", "both"):
        ar = engine.collect(engine.autoregressive_stream(target, inputs, sampling))
    if mode in ("spec", "both"):
        drafter = engine.EagleDrafter(draft if draft is not None else new_draft_for(target), target)
        media = {"image": image, "video": video}
        spec = engine.collect(engine.speculative_stream(target, drafter, inputs, sampling, tree, media=media))
    both = ar is not None and spec is not None
    return {"ar": result_summary(ar), "spec": result_summary(spec),
            "identical": (ar.token_ids == spec.token_ids) if both else None,
            "speedup": (ar.seconds / spec.seconds) if both and spec.seconds > 0 else None}


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
