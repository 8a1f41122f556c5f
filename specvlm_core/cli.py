"""`python -m specvlm_core <command>`: every capability of the core from the shell.

Bad input never shows a traceback: the message goes to stderr as one line starting
with `error:` and the exit code is 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SpecVLMError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors follow the same contract
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _add_model_args(p):
    p.add_argument("--model", default=None, help="Hub name or folder of the target VLM (default: the embedded tiny model)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own Python code (off by default; only for repositories you trust)")


def cmd_generate(args) -> int:
    from . import api, engine, media
    from .models import check_load_options, load_target, prepare_inputs
    image = video = None
    if args.image:
        kind, loaded = media.load_media(args.image, num_frames=args.frames)
        image, video = (loaded, None) if kind == "image" else (None, loaded.frames)
    else:
        video = media.load_video(args.video, num_frames=args.frames).frames
        if len(video) == 1:  # a still image given as a video is just an image
            image, video = video[0], None
    api.set_threads(args.threads)
    sampling = engine.SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    if (args.tree_top_k, args.tree_depth, args.tree_total) != (None, None, None):
        default = engine.TreeSettings()
        tree = engine.TreeSettings(top_k=default.top_k if args.tree_top_k is None else args.tree_top_k,
                                   depth=default.depth if args.tree_depth is None else args.tree_depth,
                                   total_tokens=default.total_tokens if args.tree_total is None else args.tree_total)
    else:
        tree = parse_tree(args.tree)
    sampling.validate()
    if tree != "auto":
        tree.validate()
    if not args.prompt.strip():
        raise SpecVLMError("the prompt is empty")
    check_load_options(args.model, args.device, draft=args.draft)  # fail before loading anything
    target = load_target(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    inputs = prepare_inputs(target, args.prompt, image=image, video=video)  # bad prompts fail here, early
    draft = None
    if args.mode != "ar":
        draft, _ = api.load_draft(target, args.draft)
        tree = resolve_tree(tree, target, draft, verbose=not args.json)
    elif tree == "auto":
        tree = engine.TreeSettings()
    result = api.run_generation(target, draft, args.prompt, image=image, video=video, mode=args.mode,
                                sampling=sampling, tree=tree, inputs=inputs)
    if args.json:
        print(json.dumps(result))
        return 0
    for name in ("ar", "spec"):
        r = result[name]
        if r is None:
            continue
        extra = f", tau {r['mean_accepted']:.2f} over {r['rounds']} rounds" if name == "spec" else ""
        print(f"[{name}] {r['new_tokens']} tokens in {r['seconds']:.3f}s{extra}\n{r['text']}\n")
    if result["speedup"] is not None:
        print(f"speedup {result['speedup']:.2f}x, identical: {result['identical']}")
    return 0


def cmd_tiny_train(args) -> int:
    from .tiny_vlm import train_tiny_vlm
    metrics = train_tiny_vlm(args.out, minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, threads=args.threads,
                             eval_scenes=args.eval_scenes, eval_clips=args.eval_clips, aux_weight=args.aux_weight,
                             probe_every_minutes=args.probe_every, vision_minutes=args.vision_minutes,
                             vision_lr=args.vision_lr, video_share=args.video_share)
    print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2))
    return 0


def cmd_tiny_eval(args) -> int:
    from .models import load_target
    from .tiny_vlm import evaluate_quality
    target = load_target(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    metrics = evaluate_quality(target.model, target.processor, args.scenes, args.clips, progress=True)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_distill(args) -> int:
    from .distill import DistillConfig, train
    if args.steps is not None and args.epochs is not None:
        raise SpecVLMError("give --steps or --epochs, not both")
    cfg = DistillConfig(model=args.model, data=args.data, media_dir=args.media_dir, steps=args.steps,
                        epochs=args.epochs, epoch_size=args.epoch_size, batch_size=args.batch_size, lr=args.lr,
                        out_dir=args.out, resume=args.resume, json_log=args.json_log, device=args.device,
                        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                        eval_samples=args.eval_samples, self_distill=args.self_distill, seed=args.seed,
                        keep_checkpoints=args.keep_checkpoints, trust_remote_code=args.trust_remote_code,
                        compressor={"mode": args.compressor} if args.compressor != "off" else None,
                        gate_supervision=args.gate_supervision)
    if cfg.steps is None and cfg.epochs is None:
        cfg.steps = 200
    from . import api
    api.set_threads(args.threads)
    out = train(cfg)
    print(f"draft written to {out} (use it with: python -m specvlm_core generate --draft {out} ...)")
    return 0


def parse_tree(text: str):
    """"auto" or "top_k,depth,total" -> TreeSettings | "auto"."""
    from .engine import TreeSettings
    if text == "auto":
        return "auto"
    try:
        k, d, t = (int(x) for x in text.split(","))
    except ValueError:
        raise SpecVLMError(f"--tree must be 'auto' or 'top_k,depth,total', got {text!r}") from None
    tree = TreeSettings(k, d, t)
    tree.validate()
    return tree


def resolve_tree(tree, target, draft, verbose: bool = True):
    if tree != "auto":
        return tree
    from . import autotune
    from .engine import TreeSettings
    result = autotune.auto_tree(target, draft, progress=(lambda m: print(f"auto tree: {m}", file=sys.stderr))
                                if verbose else None)
    if verbose:
        print(f"auto tree: {result['why']}", file=sys.stderr)
    return TreeSettings(**result["tree"])


def cmd_bench(args) -> int:
    from . import api, bench
    from .models import load_target
    api.set_threads(args.threads)
    tree = parse_tree(args.tree)
    cases = bench.suite(args.suite)
    target = load_target(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    draft, source = api.load_draft(target, args.draft)
    tree = resolve_tree(tree, target, draft)
    print(f"bench: {len(cases)} cases, tree {tree}, draft {source}", file=sys.stderr)
    report = bench.run_benchmark(target, draft, cases, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                                 tree=tree, progress=lambda i, n, name: print(f"[{i}/{n}] {name}", file=sys.stderr))
    bench.write_report(report, args.json, args.markdown, args.html)
    print(bench.to_markdown(report))
    return 0


def cmd_gpu_bench(args) -> int:
    from .gpu_bench import run
    report = run(device=args.device, tiny=args.tiny, suite=args.suite, out=args.json, parts=args.parts,
                 embedded_dtype=args.embedded_dtype)
    print(json.dumps({k: v for k, v in report.items() if k != "embedded_suite"}, indent=2))
    if "embedded_suite" in report:
        print(f"embedded suite: speedup {report['embedded_suite']['speedup']}, "
              f"tau {report['embedded_suite']['mean_accepted']}, lossless {report['embedded_suite']['lossless']}")
    return 0


def cmd_scaling(args) -> int:
    from .distill import scaling_curve, write_scaling_report
    if not Path(args.log).is_file():
        raise SpecVLMError(f"log file not found: {args.log}")
    curve = scaling_curve(args.log, args.steps_per_epoch)
    if not curve:
        raise SpecVLMError("no tau measurements at epoch boundaries in the log (run distill with "
                           "--eval-every equal to the steps per epoch)")
    write_scaling_report(curve, args.out)
    for c in curve:
        print(f"epoch {c['epoch']}: tau {c['tau']:.2f} (top-1 {c['top1']:.2f})")
    return 0


def cmd_ablation(args) -> int:
    from . import api, bench
    from .models import load_target
    api.set_threads(args.threads)
    target = load_target(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    draft, source = api.load_draft(target, args.draft)
    if draft.compressor is None:
        raise SpecVLMError(f"the draft {source} has no compressor; train one with distill --compressor select")
    rows = bench.run_ablation(target, draft, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                              progress=lambda g, c: print(f"{g}: {c}", file=sys.stderr))
    versus = bench.head_to_head(rows)
    table = (bench.ablation_table(rows) + "\nSpecVLM (select) vs EagleVLM, paired per repeat:\n\n"
             + bench.head_to_head_table(versus))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "select_vs_eagle": versus}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


def cmd_examples(args) -> int:
    from .examples import write_examples
    write_examples(args.out)
    print(f"wrote examples to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m specvlm_core",
                     description="SpecVLM Studio core: lossless speculative decoding for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="decode one image/video + prompt, plain and/or speculative")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (an animated GIF is read as a clip)")
    src.add_argument("--video", help="video file (mp4, webm, ...) or animated GIF")
    g.add_argument("--prompt", required=True, help="the question")
    _add_model_args(g)
    g.add_argument("--draft", default=None, help="draft folder (default: the shipped draft of the embedded model)")
    g.add_argument("--mode", choices=["ar", "spec", "both"], default="both")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--frames", type=int, default=None, help="frames sampled from a video (default 8)")
    g.add_argument("--tree", default="auto",
                   help="auto (default: measured for this device, model and draft; cached) or top_k,depth,total")
    g.add_argument("--tree-top-k", type=int, default=None, help="fix the tree's top_k (others default to 4,6,16)")
    g.add_argument("--tree-depth", type=int, default=None)
    g.add_argument("--tree-total", type=int, default=None, help="draft nodes verified per round")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tiny-train", help="train the embedded tiny VLM on the generated world")
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=88.0, help="time budget (default 88, the shipped model's)")
    t.add_argument("--max-steps", type=int, default=100000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--eval-scenes", type=int, default=200)
    t.add_argument("--eval-clips", type=int, default=100)
    t.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the dense visual-token object loss (0 = language loss only)")
    t.add_argument("--probe-every", type=float, default=10.0,
                   help="minutes between small held-out quality probes logged to train_log.jsonl (0 = none)")
    t.add_argument("--vision-minutes", type=float, default=15.0,
                   help="minutes (of the budget) that first train the vision tower alone on the dense visual loss")
    t.add_argument("--vision-lr", type=float, default=2e-3, help="peak learning rate of the vision phase")
    t.add_argument("--video-share", type=float, default=0.4, help="fraction of batches that are clips")
    t.set_defaults(func=cmd_tiny_train)

    e = sub.add_parser("tiny-eval", help="measure the quality metrics of a tiny model on held-out world data")
    _add_model_args(e)
    e.add_argument("--scenes", type=int, default=200)
    e.add_argument("--clips", type=int, default=100)
    e.set_defaults(func=cmd_tiny_eval)

    d = sub.add_parser("distill", help="train a draft for a target by online-logit distillation")
    _add_model_args(d)
    d.add_argument("--data", default="generated", help="'generated' (the built-in world) or a LLaVA-format JSON file")
    d.add_argument("--media-dir", default=None, help="folder the JSON's image/video paths are relative to")
    d.add_argument("--steps", type=int, default=None, help="optimiser steps (default 200 unless --epochs)")
    d.add_argument("--epochs", type=float, default=None)
    d.add_argument("--epoch-size", type=int, default=1024, help="samples per epoch of generated data")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--out", default="runs/draft", help="output folder (draft + checkpoints/)")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    d.add_argument("--json-log", default=None, help="append one JSON line of metrics per step")
    d.add_argument("--checkpoint-every", type=int, default=50)
    d.add_argument("--eval-every", type=int, default=50, help="measure tau on held-out prompts every N steps")
    d.add_argument("--eval-samples", type=int, default=6)
    d.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (older ones pruned)")
    d.add_argument("--self-distill", action="store_true", help="train on the target's own greedy answers")
    d.add_argument("--compressor", default="off", help="off, or a compressor mode (see docs)")
    d.add_argument("--gate-supervision", choices=("regret", "cost"), default="regret",
                   help="how a select gate learns: towards the measured best option per example (regret, "
                        "default) or through the straight-through estimator and expected cost (cost)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_distill)

    b = sub.add_parser("bench", help="benchmark plain, prompt-lookup, EagleVLM and SpecVLM side by side")
    _add_model_args(b)
    b.add_argument("--draft", default=None)
    b.add_argument("--suite", default="default", choices=["quick", "default"])
    b.add_argument("--tree", default="auto", help="auto (measured for this device) or top_k,depth,total")
    b.add_argument("--max-new-tokens", type=int, default=96)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--json", default=None, help="write the full report as JSON")
    b.add_argument("--markdown", default=None, help="write the table as Markdown")
    b.add_argument("--html", default=None, help="write a plotly chart as HTML")
    b.set_defaults(func=cmd_bench)

    ab = sub.add_parser("ablation", help="compressor ablation: tau and speedup per primitive, ratio and mode")
    _add_model_args(ab)
    ab.add_argument("--draft", default=None)
    ab.add_argument("--max-new-tokens", type=int, default=64)
    ab.add_argument("--repeats", type=int, default=3, help="interleaved repeats per option and input (default 3)")
    ab.add_argument("--json", default=None)
    ab.add_argument("--markdown", default=None)
    ab.set_defaults(func=cmd_ablation)

    sc = sub.add_parser("scaling", help="tau after each epoch of a distill run (JSON + plotly HTML)")
    sc.add_argument("--log", required=True, help="the run's --json-log file")
    sc.add_argument("--steps-per-epoch", type=int, required=True)
    sc.add_argument("--out", default="docs")
    sc.set_defaults(func=cmd_scaling)

    gb = sub.add_parser("gpu-bench", help="verify-latency and draft-cost curves of real architectures "
                                         "(random weights, no network) plus the embedded suite, on one GPU")
    gb.add_argument("--device", default="auto")
    gb.add_argument("--tiny", action="store_true", help="shrunken configs: checks the code path on a CPU")
    gb.add_argument("--suite", default="quick", choices=["quick", "default"])
    gb.add_argument("--json", default="gpu_bench.json")
    gb.add_argument("--parts", nargs="+", default=["real", "embedded"], choices=["real", "embedded"],
                    help="real: verify/draft curves of LLaVA-1.5-7B and Qwen2-VL-2B; embedded: the suite")
    gb.add_argument("--embedded-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of the embedded model (default: bf16/fp16 on a GPU)")
    gb.set_defaults(func=cmd_gpu_bench)

    x = sub.add_parser("examples", help="write the example images and clips")
    x.add_argument("--out", default="assets/examples")
    x.set_defaults(func=cmd_examples)
    return parser


def _quiet_libraries() -> None:
    """Keep stderr for our own messages: no per-tensor loading bars from transformers."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except SpecVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
