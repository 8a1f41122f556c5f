"""GPU measurements that need no network: real architectures with random weights.

On one GPU this measures, in well under 8 minutes:
1. the target's verify latency against the number of tree nodes, and the EagleVLM
   draft's cost per tree expansion, for LLaVA-1.5-7B (fp16) and Qwen2-VL-2B (bf16)
   built from their published hyperparameters with random weights (speed does not
   depend on the weights);
2. the end-to-end benchmark suite on the embedded model.
`--tiny` shrinks every config so the same code path runs on a CPU in seconds (tests).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import engine
from .draft import DraftConfig, EagleDraft
from .models import Target
from .tree import DraftTree

# Published sizes (config.json of the Hub checkpoints), so nothing is downloaded.
REAL_CONFIGS = {
    "llava-1.5-7b": dict(
        family="llava", dtype=torch.float16,
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                  rms_norm_eps=1e-5),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)),
    "qwen2-vl-2b": dict(
        family="qwen2_vl", dtype=torch.bfloat16,
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)


def build_random_target(name: str, device: torch.device, tiny: bool = False) -> Target:
    """A randomly initialised model of a real architecture, created directly on device."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    spec = REAL_CONFIGS[name]
    text = dict(spec["text"])
    vision = dict(spec["vision"])
    if tiny:
        text.update(TINY)
        if "rope_parameters" in text:
            text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2, 3, 3]}
        if spec["family"] == "llava":
            vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=56)
        else:
            vision.update(depth=1, embed_dim=32, num_heads=2, hidden_size=TINY["hidden_size"])
    dtype = spec["dtype"] if device.type == "cuda" else torch.float32
    with torch.device(device):
        if spec["family"] == "llava":
            text.pop("model_type")
            vision.pop("model_type")
            cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                              image_token_index=text["vocab_size"] - 1)
            model = LlavaForConditionalGeneration._from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
        else:
            cfg = Qwen2VLConfig(text_config=text, vision_config=vision)
            model = Qwen2VLForConditionalGeneration._from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return Target(model=model, processor=None, name=name, family=spec["family"])


def _timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        engine.sync_device(device)
        t0 = time.perf_counter()
        fn()
        engine.sync_device(device)
        times.append((time.perf_counter() - t0) * 1000)
    times = sorted(times[1:])
    return times[len(times) // 2]


@torch.no_grad()
def verify_curve(target: Target, context: int = 640, sizes=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128),
                 repeats: int = 5) -> dict:
    """Median ms of one tree-verification forward of n nodes after a text context."""
    runner = engine.TargetRunner(target)
    ids = torch.randint(0, target.vocab_size - 2, (1, context), device=target.device)
    runner.prefill({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    curve = {}
    for n in sizes:
        tree = DraftTree(tokens=torch.randint(0, target.vocab_size - 2, (n,)), parents=torch.arange(-1, n - 1),
                         depths=torch.arange(n), scores=torch.zeros(n))

        def once():
            runner.verify(tree)
            engine.compact_cache(runner.cache, runner.length, [])
        curve[n] = round(_timed(once, target.device, repeats), 3)
    return curve


@torch.no_grad()
def draft_costs(target: Target, context: int = 640, top_ks=(1, 4, 8, 10), depth: int = 6, repeats: int = 5) -> dict:
    """Median ms per tree expansion of a one-layer EagleVLM draft of the target's width."""
    draft = EagleDraft(DraftConfig.for_target(target)).to(device=target.device, dtype=target.dtype).eval()
    drafter = engine.EagleDrafter(draft, target)
    h = target.hidden_size
    feats = torch.randn(context, h, device=target.device, dtype=target.dtype)
    drafter.start(feats, feats.clone(), 1)
    out = {}
    for k in top_ks:
        out[k] = round(_timed(lambda: drafter.propose(1, engine.TreeSettings(k, depth, k * depth)), target.device,
                              repeats) / depth, 3)
    return out


PARTS = ("real", "embedded")


def run(device: str = "auto", tiny: bool = False, suite: str = "quick", out: str | None = None,
        parts=PARTS, embedded_dtype: str | None = None) -> dict:
    """Measure the given parts ("real": the two real architectures' curves; "embedded":
    the benchmark suite on the embedded model, skipped with tiny). The JSON at out is
    rewritten after each model, so a part that fails keeps what was measured before.
    embedded_dtype: the embedded model's dtype (None: the device's default, bf16/fp16 on
    a GPU; "float32" checks token identity without half-precision rounding)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown gpu-bench part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "tiny": tiny,
              "torch": torch.__version__, "models": {}}
    t_start = time.time()

    def save() -> None:
        report["total_seconds"] = round(time.time() - t_start, 1)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2))
    for name in REAL_CONFIGS if "real" in parts else ():
        t0 = time.time()
        target = build_random_target(name, dev, tiny=tiny)
        report["models"][name] = {
            "dtype": str(target.dtype), "parameters_b": round(sum(p.numel() for p in target.model.parameters()) / 1e9, 3),
            "verify_ms_by_nodes": verify_curve(target, context=64 if tiny else 640),
            "draft_ms_per_expansion_by_top_k": draft_costs(target, context=64 if tiny else 640),
            "seconds": round(time.time() - t0, 1)}
        del target
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if "embedded" in parts and not tiny:
        from . import api, autotune, bench
        from .engine import TreeSettings
        from .models import load_target
        target = load_target(None, device=str(dev), dtype=embedded_dtype)
        draft, _ = api.load_draft(target)
        # The tree chosen for this GPU, as `bench` does by default: verify cost grows far
        # more slowly with the node count here than on a CPU.
        chosen = autotune.auto_tree(target, draft, use_cache=False)
        report["embedded_tree"] = {"tree": chosen["tree"], "why": chosen["why"], "costs": chosen["costs"],
                                   "dtype": str(target.dtype)}
        report["embedded_suite"] = bench.run_benchmark(target, draft, bench.suite(suite), repeats=2,
                                                       tree=TreeSettings(**chosen["tree"]))
    save()
    return report
