"""Benchmarks: plain decoding, HF prompt-lookup assisted generation, EagleVLM and
SpecVLM side by side, in one process, interleaved, warm-up discarded.

Speed is reported as ratios measured in the same run (speedup = plain seconds /
method seconds for the same input and max tokens), never as absolute asserts.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import engine, world
from .models import prepare_inputs


@dataclass
class Case:
    name: str
    prompt: str
    image: object = None
    video: list | None = None
    temperature: float = 0.0


def _world_case(name, seed, kind, temperature, size=None, frames=None, task=None):
    smp = world.make_sample(seed, kind=kind, task=task, size_range=(size, size) if size else (64, 384),
                            video_size_range=(96, 128), n_frames=frames)
    return Case(name, smp.question, image=smp.frames[0] if kind == "image" else None,
                video=smp.frames if kind == "video" else None, temperature=temperature)


def suite(name: str) -> list[Case]:
    """quick: 3 inputs at T=0 plus one at T=1; default: prompts x resolutions x clip
    lengths x temperatures 0 and 1."""
    base = world.EVAL_SEED + 9 * 10**6
    if name == "quick":
        return [_world_case("img96-describe", base, "image", 0.0, 96, task="describe"),
                _world_case("img320-describe", base + 1, "image", 0.0, 320, task="describe"),
                _world_case("clip8-describe", base + 2, "video", 0.0, frames=8, task="describe"),
                _world_case("img160-describe-T1", base + 3, "image", 1.0, 160, task="describe")]
    if name != "default":
        raise ValueError(f"unknown suite {name!r}: quick or default")
    cases = []
    for t in (0.0, 1.0):
        tag = "" if t == 0 else "-T1"
        for i, size in enumerate((64, 128, 224, 384)):
            cases.append(_world_case(f"img{size}-describe{tag}", base + 10 + i, "image", t, size, task="describe"))
        cases.append(_world_case(f"img192-count{tag}", base + 20, "image", t, 192, task="count"))
        for i, frames in enumerate((4, 8, 16)):
            cases.append(_world_case(f"clip{frames}-describe{tag}", base + 30 + i, "video", t, frames=frames,
                                     task="describe"))
    return cases


# ----------------------------------------------------------------------- methods

def run_plain(target, inputs, sampling, **_):
    return engine.collect(engine.autoregressive_stream(target, inputs, sampling))


def run_spec(target, inputs, sampling, draft=None, tree=None, media=None, compressor="draft", force=None, **_):
    drafter = engine.EagleDrafter(draft, target, compressor=compressor, force_option=force)
    return engine.collect(engine.speculative_stream(target, drafter, inputs, sampling, tree, media=media))


def run_prompt_lookup(target, inputs, sampling, tree=None, media=None, **_):
    """Prompt lookup (n-gram) drafting run by this engine (engine.PromptLookupDrafter,
    10 tokens per draft like transformers' prompt_lookup_num_tokens=10)."""
    return engine.collect(engine.speculative_stream(target, engine.PromptLookupDrafter(num_tokens=10), inputs,
                                                    sampling, tree, media=media))


def run_hf_prompt_lookup(target, inputs, sampling, **_):
    """transformers' assisted generation with prompt lookup (n-gram drafts), timed
    end to end like the others. Returns the error text where the model does not
    support it (e.g. Qwen2-VL: the n-gram lookup copies image placeholder tokens
    from the prompt, and the re-run vision features then do not match)."""
    t0 = time.perf_counter()
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, prompt_lookup_num_tokens=10)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False)
    try:
        with torch.no_grad():
            out = target.model.generate(**inputs, **kwargs)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    seconds = time.perf_counter() - t0
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return engine.GenerationResult("hf_prompt_lookup", ids, target.tokenizer.decode(ids, skip_special_tokens=True),
                                   seconds, 0, 0.0, [], None)


def _stats(res: engine.GenerationResult) -> dict:
    rounds = [e for e in res.events if e.round > 0] if res.method == "spec" else []
    n = max(1, len(rounds))
    return {"seconds": res.seconds, "new_tokens": res.new_tokens,
            "tokens_per_s": res.new_tokens / res.seconds if res.seconds > 0 else 0.0,
            "tau": res.mean_accepted, "prefill_ms": res.prefill_ms,
            "draft_ms": sum(e.draft_ms for e in rounds) / n if rounds else None,
            "verify_ms": sum(e.verify_ms for e in rounds) / n if rounds else None,
            "overhead_ms": sum(e.overhead_ms for e in rounds) / n if rounds else None,
            "token_ids": res.token_ids}


def run_benchmark(target, draft, cases: list[Case], max_new_tokens: int = 96, repeats: int = 2,
                  tree: engine.TreeSettings | None = None,
                  methods=("plain", "hf_prompt_lookup", "prompt_lookup", "eagle", "specvlm"),
                  progress=None) -> dict:
    """Every method on every case, interleaved (the order rotates per repeat), after a
    discarded warm-up of each. The draft's compressor is on for "specvlm" and off for
    "eagle" (the same trained weights otherwise)."""
    tree = tree or engine.TreeSettings()
    runners = {"plain": run_plain, "hf_prompt_lookup": run_hf_prompt_lookup, "prompt_lookup": run_prompt_lookup,
               "eagle": run_spec, "specvlm": run_spec}
    results = {m: [] for m in methods}
    unsupported: dict[str, str] = {}
    for ci, case in enumerate(cases):
        inputs = prepare_inputs(target, case.prompt, image=case.image, video=case.video)
        media = {"image": case.image, "video": case.video}
        per_method = {m: [] for m in methods}
        order = list(methods)
        for rep in range(repeats + 1):
            for m in order:
                if m in unsupported:
                    continue
                sampling = engine.SamplingSettings(temperature=case.temperature, max_new_tokens=max_new_tokens,
                                                   seed=rep)
                res = runners[m](target, inputs, sampling, draft=draft, tree=tree, media=media,
                                 compressor="draft" if m == "specvlm" else None)
                if isinstance(res, str):
                    unsupported[m] = res
                    continue
                if rep > 0 or ci > 0:  # the very first pass of each method is a warm-up
                    per_method[m].append(_stats(res))
            order = order[1:] + order[:1]
        plain_ids = per_method["plain"][0]["token_ids"] if per_method.get("plain") else None
        for m in methods:
            runs = per_method[m]
            if not runs:
                continue
            med = lambda k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None  # noqa: E731
            row = {"case": case.name, "temperature": case.temperature, "method": m,
                   "seconds": med("seconds"), "new_tokens": runs[0]["new_tokens"], "tokens_per_s": med("tokens_per_s"),
                   "tau": med("tau"), "prefill_ms": med("prefill_ms"), "draft_ms": med("draft_ms"),
                   "verify_ms": med("verify_ms"), "overhead_ms": med("overhead_ms")}
            if case.temperature == 0 and plain_ids is not None:
                row["matches_plain"] = all(r["token_ids"] == plain_ids for r in runs)
            results[m].append(row)
        if progress:
            progress(ci + 1, len(cases), case.name)
    return summarise(results, cases, tree, repeats, max_new_tokens, target, unsupported)


def summarise(results: dict, cases, tree, repeats, max_new_tokens, target, unsupported) -> dict:
    plain = {(r["case"]): r for r in results.get("plain", [])}
    table = []
    for m, rows in results.items():
        if not rows:
            table.append({"method": m, "supported": False, "reason": unsupported.get(m, "")})
            continue
        for r in rows:
            p = plain.get(r["case"])
            r["speedup"] = (p["seconds"] / r["seconds"]) if p and r["seconds"] else None
        for temp in (0.0, 1.0):
            sel = [r for r in rows if r["temperature"] == temp]
            if not sel:
                continue
            taus = [r["tau"] for r in sel if r["tau"] is not None]
            entry = {"method": m, "temperature": temp, "supported": True, "cases": len(sel),
                     "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in sel),
                     "median_speedup": statistics.median(r["speedup"] for r in sel if r["speedup"] is not None),
                     "mean_tau": statistics.mean(taus) if taus else None,
                     "median_prefill_ms": statistics.median(r["prefill_ms"] for r in sel)}
            for k in ("draft_ms", "verify_ms", "overhead_ms"):
                vals = [r[k] for r in sel if r[k] is not None]
                entry[f"median_{k}"] = statistics.median(vals) if vals else None
            if temp == 0:
                entry["lossless"] = all(r.get("matches_plain", True) for r in sel)
            table.append(entry)
    head = next((e for e in table if e["method"] == "specvlm" and e.get("temperature") == 0.0), None)
    plain0 = next((e for e in table if e["method"] == "plain" and e.get("temperature") == 0.0), None)
    ideal = None
    if head and plain0 and head["mean_tau"]:
        plain_step_ms = 1000 / plain0["median_tokens_per_s"]
        round_ms = head["median_draft_ms"] + head["median_verify_ms"] + head["median_overhead_ms"]
        ideal = {"ideal_speedup": head["mean_tau"] * plain_step_ms / round_ms if round_ms else None,
                 "fraction_of_ideal": head["median_speedup"] / (head["mean_tau"] * plain_step_ms / round_ms)
                 if round_ms else None,
                 "overhead_share": head["median_overhead_ms"] / round_ms if round_ms else None,
                 "free_draft_speedup": free_draft_speedup(
                     [r for r in results.get("specvlm", []) if r["temperature"] == 0], plain)}
    # SpecVLM against prompt lookup, per case (same input and budget), at T=0.
    lookup = {r["case"]: r for r in results.get("prompt_lookup", []) if r["temperature"] == 0}
    pairs = [lookup[r["case"]]["seconds"] / r["seconds"] for r in results.get("specvlm", [])
             if r["temperature"] == 0 and r["case"] in lookup and r["seconds"]]
    return {
        "speedup": head["median_speedup"] if head else None,
        "vs_prompt_lookup": statistics.median(pairs) if pairs else None,
        "mean_accepted": head["mean_tau"] if head else None,
        "lossless": all(e.get("lossless", True) for e in table if e.get("temperature") == 0.0),
        "hardware": hardware_line(target),
        "conditions": {"tree": vars(tree), "repeats": repeats, "max_new_tokens": max_new_tokens,
                       "cases": [c.name for c in cases], "warmup": "first pass discarded",
                       "unsupported": unsupported},
        "ideal": ideal, "methods": table, "rows": [r for rows in results.values() for r in rows],
    }


def free_draft_speedup(spec_rows: list[dict], plain: dict) -> float | None:
    """Median end-to-end speedup the cases would reach if drafting cost nothing.

    Per case: plain seconds / (prefill + rounds x (verify + overhead)), with rounds =
    (new tokens - 1) / tau (the prefill yields the first token) at the measured tau,
    verify and overhead. It says how much a faster draft could still give: the prefill
    and the verification forwards are paid either way."""
    bounds = []
    for r in spec_rows:
        p = plain.get(r["case"])
        if not p or not r.get("tau") or r.get("verify_ms") is None:
            continue
        rounds = max(0, r["new_tokens"] - 1) / r["tau"]
        spec_ms = r["prefill_ms"] + rounds * (r["verify_ms"] + (r.get("overhead_ms") or 0.0))
        if spec_ms > 0:
            bounds.append(1000 * p["seconds"] / spec_ms)
    return statistics.median(bounds) if bounds else None


def hardware_line(target) -> str:
    if target.device.type == "cuda":
        dev = torch.cuda.get_device_name(target.device)
    else:
        dev = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{dev}; torch {torch.__version__}; {Path(target.name).name} ({target.dtype}); batch 1"


def to_markdown(report: dict) -> str:
    lines = [f"Hardware: {report['hardware']}. Tree: {report['conditions']['tree']}, "
             f"{report['conditions']['max_new_tokens']} new tokens, {len(report['conditions']['cases'])} cases, "
             "median of interleaved repeats, warm-up discarded.", "",
             "| Method | T | tokens/s | speedup vs plain | tau | prefill ms | draft ms/round | verify ms/round | "
             "overhead ms/round | lossless |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for e in report["methods"]:
        if not e.get("supported"):
            lines.append(f"| {e['method']} | - | fails on this model: {e.get('reason', '')[:90]} | | | | | | | |")
            continue
        lines.append(f"| {e['method']} | {e['temperature']:g} | {fmt(e['median_tokens_per_s'], 1)} | "
                     f"{fmt(e['median_speedup'])}x | {fmt(e['mean_tau'])} | {fmt(e['median_prefill_ms'], 1)} | "
                     f"{fmt(e['median_draft_ms'])} | {fmt(e['median_verify_ms'])} | {fmt(e['median_overhead_ms'])} | "
                     f"{'yes' if e.get('lossless') else ('-' if 'lossless' not in e else 'NO')} |")
    ideal = report.get("ideal") or {}
    if ideal.get("ideal_speedup"):
        lines += ["", f"SpecVLM at T=0 against its bounds: the ideal tau x plain step / round time is "
                      f"{ideal['ideal_speedup']:.2f}x (reached: {ideal['fraction_of_ideal']:.0%}); engine overhead is "
                      f"{ideal['overhead_share']:.1%} of a round"
                  + (f"; with a draft that cost nothing (same tau, prefill and verification) the suite would reach "
                     f"{ideal['free_draft_speedup']:.2f}x." if ideal.get("free_draft_speedup") else ".")]
    return "\n".join(lines) + "\n"


def to_html(report: dict) -> str:
    import plotly.graph_objects as go
    rows = [r for r in report["rows"] if r.get("speedup") is not None]
    fig = go.Figure()
    for m in sorted({r["method"] for r in rows}):
        sel = [r for r in rows if r["method"] == m]
        fig.add_bar(name=m, x=[f"{r['case']}" for r in sel], y=[r["speedup"] for r in sel])
    fig.update_layout(title=f"Speedup vs plain decoding ({report['hardware']})", barmode="group",
                      yaxis_title="speedup (x)")
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


def write_report(report: dict, json_path=None, markdown_path=None, html_path=None) -> None:
    for path, text in ((json_path, json.dumps(report, indent=2)), (markdown_path, to_markdown(report) if markdown_path
                                                                   else None),
                       (html_path, to_html(report) if html_path else None)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


# ---------------------------------------------------------------------- ablation

ABLATION_OPTIONS = ("eagle", "prune_random:4", "prune_random:16", "prune_guided:4", "prune_guided:16", "pool:4",
                    "pool:16", "conv:4", "resampler:2", "text_only:0", "select")


def ablation_cases() -> dict[str, list[Case]]:
    """Small images, large images and clips, T=0 (the paper's ablation setting)."""
    base = world.EVAL_SEED + 11 * 10**6
    return {
        "small images": [_world_case(f"img{s}", base + i, "image", 0.0, s, task="describe")
                         for i, s in enumerate((64, 96, 128))],
        "large images": [_world_case(f"img{s}", base + 10 + i, "image", 0.0, s, task="describe")
                         for i, s in enumerate((320, 352, 384))],
        "clips": [_world_case(f"clip{f}", base + 20 + i, "video", 0.0, frames=f, task="describe")
                  for i, f in enumerate((8, 12, 16))],
    }


def run_ablation(target, draft, options=ABLATION_OPTIONS, max_new_tokens: int = 64,
                 tree: engine.TreeSettings | None = None, progress=None, repeats: int = 3) -> list[dict]:
    """tau and speedup vs plain for the draft without compressor ("eagle"), each
    primitive forced at its ratio, and the gate's own choice ("select"), per input
    group. Every repeat runs plain decoding and then every option once (interleaved, so
    slow phases of a noisy machine hit all options alike); each row keeps the
    per-repeat seconds, and speedup = median plain seconds / median option seconds."""
    tree = tree or engine.TreeSettings()
    rows = []
    groups = ablation_cases()
    for group, cases in groups.items():
        for case in cases:
            inputs = prepare_inputs(target, case.prompt, image=case.image, video=case.video)
            media = {"image": case.image, "video": case.video}
            sampling = engine.SamplingSettings(max_new_tokens=max_new_tokens)
            run_plain(target, inputs, sampling)  # warm-up
            plain_runs, spec_runs = [], {opt: [] for opt in options}
            for _ in range(repeats):
                plain_runs.append(run_plain(target, inputs, sampling))
                for opt in options:
                    spec_runs[opt].append(run_spec(target, inputs, sampling, draft=draft, tree=tree, media=media,
                                                   compressor=None if opt == "eagle" else "draft",
                                                   force=None if opt in ("eagle", "select") else opt))
            plain = plain_runs[0]
            plain_s = statistics.median(r.seconds for r in plain_runs)
            for opt in options:
                spec = spec_runs[opt][0]
                spec_s = [r.seconds for r in spec_runs[opt]]
                first = spec.events[1].info if len(spec.events) > 1 else {}
                rows.append({"group": group, "case": case.name, "option": opt, "tau": spec.mean_accepted,
                             "speedup": plain_s / statistics.median(spec_s), "seconds": spec_s,
                             "plain_seconds": [r.seconds for r in plain_runs],
                             "lossless": all(r.token_ids == plain.token_ids for r in spec_runs[opt]),
                             "visual_before": first.get("visual_tokens_before"),
                             "visual_after": first.get("visual_tokens_after"),
                             "draft_prefill_ms": first.get("draft_prefill_ms"),
                             "chosen": f"{first.get('primitive')}:{first.get('ratio')}" if opt == "select" else None})
            if progress:
                progress(group, case.name)
    return rows


def head_to_head(rows: list[dict], option: str = "select", baseline: str = "eagle") -> dict:
    """Per input group: option vs baseline from the same ablation run. time_ratio =
    median over cases and repeats of baseline seconds / option seconds in the same
    repeat (paired, so machine noise common to both cancels; > 1 means the option is
    faster); tau_ratio = option tau / baseline tau (mean over cases)."""
    out = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        base = {r["case"]: r for r in rows if r["group"] == group and r["option"] == baseline}
        opt = {r["case"]: r for r in rows if r["group"] == group and r["option"] == option}
        pairs = [b / o for case in opt if case in base
                 for b, o in zip(base[case]["seconds"], opt[case]["seconds"])]
        taus = [opt[c]["tau"] / base[c]["tau"] for c in opt if c in base and base[c]["tau"]]
        if pairs:
            out[group] = {"time_ratio": statistics.median(pairs), "pairs": len(pairs),
                          "faster_in": sum(p > 1 for p in pairs),
                          "tau_ratio": statistics.mean(taus) if taus else None}
    return out


def head_to_head_table(versus: dict) -> str:
    """Markdown of head_to_head's result, one row per input group."""
    return ("| group | EagleVLM s / SpecVLM s (median) | SpecVLM faster in | tau SpecVLM / EagleVLM |\n"
            "|---|---|---|---|\n" +
            "".join(f"| {g} | {v['time_ratio']:.3f} | {v['faster_in']}/{v['pairs']} | {v['tau_ratio']:.3f} |\n"
                    for g, v in versus.items()))


def ablation_table(rows: list[dict]) -> str:
    """Markdown: one row per option, speedup / tau per input group (means over cases)."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    options = list(dict.fromkeys(r["option"] for r in rows))
    lines = ["| option | " + " | ".join(f"{g}: speedup / tau / visual tokens" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for opt in options:
        cells = []
        for g in groups:
            sel = [r for r in rows if r["group"] == g and r["option"] == opt]
            sp = statistics.mean(r["speedup"] for r in sel)
            tau = statistics.mean(r["tau"] for r in sel)
            after = [r["visual_after"] for r in sel if r["visual_after"] is not None]
            before = [r["visual_before"] for r in sel if r["visual_before"] is not None]
            vis = f"{statistics.mean(after):.0f}/{statistics.mean(before):.0f}" if after else "all"
            cells.append(f"{sp:.2f}x / {tau:.2f} / {vis}")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
