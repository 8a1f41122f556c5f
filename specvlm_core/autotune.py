"""Hardware-aware tree selection ("auto" tree settings).

EAGLE's reference code times the target on a few tree sizes and divides by a hand-set
growth factor. Here both halves are measured:

1. cost: the target's verify latency as a function of the number of tree nodes, and
   the draft's per-expansion cost, timed on this device;
2. benefit: acceptance statistics of *this* draft. Calibration rounds are decoded
   greedily with one large tree; the target's argmax after every node of it is
   recorded, so the accepted length that any smaller tree (top_k' <= K, depth' <= D,
   total' <= T) would have had in the same round is computed exactly, offline, by
   restricting the large tree to the nodes the small one would keep.

The chosen setting maximises expected tokens per second = E[tau] / (draft + verify
+ overhead time per round). Results are cached per (device, model, draft) in
~/.cache/specvlm_studio/autotree.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import engine
from .errors import ParameterError
from .tree import children_lists

GRID_TOP_K = (1, 2, 3, 4, 6, 8)
GRID_DEPTH = (2, 3, 4, 5, 6, 7, 8, 10, 12)
GRID_TOTAL = (4, 8, 12, 16, 24, 32, 48, 64)
# As deep as the deepest setting on the grid: a smaller tree is scored by restricting this one.
CALIBRATION_TREE = engine.TreeSettings(top_k=8, depth=max(GRID_DEPTH), total_tokens=64)
AUTOTUNE_VERSION = 4  # v2: chains take the engine's shortcut, depths 10 and 12; v4: the leaner draft step
CACHE_PATH = Path(os.environ.get("SPECVLM_CACHE", Path.home() / ".cache" / "specvlm_studio")) / "autotree.json"


def sibling_ranks(parents: list[int], scores: list[float]) -> list[int]:
    """Rank of each node among its siblings by score (0 = best); root 0."""
    ranks = [0] * len(parents)
    for kids in children_lists(torch.tensor(parents)):
        for r, c in enumerate(sorted(kids, key=lambda i: -scores[i])):
            ranks[c] = r
    return ranks


def accepted_length(round_record: dict, top_k: int, depth: int, total: int) -> int:
    """Tokens a (top_k, depth, total) tree would have emitted in a recorded round.

    round_record: tree dict (tokens, parents, depths, scores) of the calibration tree
    and target_choice (the target's argmax after each node). The smaller tree keeps
    nodes with sibling rank < top_k and depth <= depth, then the `total` best scores
    (ancestors first, as select_tree does); its accepted path follows the target's
    choices. Returns accepted drafts + 1 (the bonus token)."""
    tree = round_record["tree"]
    parents, depths, scores = tree["parents"], tree["depths"], tree["scores"]
    ranks = round_record.get("ranks") or sibling_ranks(parents, scores)
    allowed = [i == 0 or (ranks[i] < top_k and depths[i] <= depth) for i in range(len(parents))]
    # A node is only usable if its whole ancestry is allowed.
    for i in range(1, len(parents)):
        allowed[i] = allowed[i] and allowed[parents[i]]
    candidates = sorted((i for i in range(1, len(parents)) if allowed[i]), key=lambda i: (-scores[i], depths[i]))
    kept = {0} | set(candidates[:total])
    tokens, choice = tree["tokens"], round_record["target_choice"]
    children = children_lists(torch.tensor(parents))
    node, length = 0, 1
    while True:
        nxt = next((c for c in children[node] if c in kept and tokens[c] == choice[node]), None)
        if nxt is None:
            return length
        node, length = nxt, length + 1


def calibrate(target, draft, examples, max_new_tokens: int = 48) -> list[dict]:
    """Greedy decoding of examples with the large calibration tree; returns the rounds."""
    from .models import prepare_inputs
    rounds = []
    for ex in examples:
        inputs = prepare_inputs(target, ex.prompt, image=ex.image, video=ex.video)
        stream = engine.speculative_stream(target, engine.EagleDrafter(draft, target), inputs,
                                           engine.SamplingSettings(max_new_tokens=max_new_tokens), CALIBRATION_TREE,
                                           media={"image": ex.image, "video": ex.video})
        for ev in stream:
            if ev.round > 0 and ev.target_choice is not None:
                rec = {"tree": ev.tree, "target_choice": ev.target_choice}
                rec["ranks"] = sibling_ranks(ev.tree["parents"], ev.tree["scores"])
                rounds.append(rec)
    return rounds


@torch.no_grad()
def measure_costs(target, draft, example, sizes=(1, 2, 4, 8, 16, 32, 64), repeats: int = 3) -> dict:
    """verify_ms[n] for trees of n nodes (chains) and draft_ms per expansion at each
    top_k, both measured at the context length of `example`."""
    from .models import prepare_inputs
    from .tree import DraftTree
    inputs = prepare_inputs(target, example.prompt, image=example.image, video=example.video)
    runner = engine.TargetRunner(target)
    logits, features, embeds = runner.prefill(inputs)
    root = int(logits.argmax())
    verify = {}
    for n in sizes:
        tree = DraftTree(tokens=torch.full((n,), root), parents=torch.arange(-1, n - 1),
                         depths=torch.arange(n), scores=torch.zeros(n))
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            runner.verify(tree)
            engine.sync_device(target.device)
            times.append((time.perf_counter() - t0) * 1000)
            engine.compact_cache(runner.cache, runner.length, [])  # back to the bare context
        verify[n] = sorted(times[1:])[len(times[1:]) // 2]
    drafter = engine.EagleDrafter(draft, target)
    drafter.start(features, embeds, root, visual_mask=engine.visual_mask(target, inputs),
                  media={"grid": engine.visual_grid(target, inputs)})
    draft_ms = {}
    for k in GRID_TOP_K:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            # total 4k: enough nodes that top_k 1 is a chain of 4 levels too
            drafter.propose(root, engine.TreeSettings(top_k=k, depth=4, total_tokens=4 * k))
            engine.sync_device(target.device)
            times.append((time.perf_counter() - t0) * 1000 / 4)
        draft_ms[k] = sorted(times[1:])[len(times[1:]) // 2]
    return {"verify_ms": verify, "draft_step_ms": draft_ms}


def _interp(table: dict, n: int) -> float:
    xs = sorted(table)
    if n <= xs[0]:
        return table[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return table[a] + (table[b] - table[a]) * (n - a) / (b - a)
    return table[xs[-1]] * n / xs[-1]


def choose_tree(rounds: list[dict], costs: dict, overhead_ms: float = 0.5) -> tuple[engine.TreeSettings, list[dict]]:
    """The setting with the best expected tokens/s, and the scored grid (best first)."""
    table = []
    for k in GRID_TOP_K:
        for d in GRID_DEPTH:
            # top_k 1 is a chain of d nodes (fewer nodes would be a shallower chain).
            for total in ([d] if k == 1 else GRID_TOTAL):
                if total > k * d or total < min(k, d):
                    continue
                tau = sum(accepted_length(r, k, d, total) for r in rounds) / max(1, len(rounds))
                round_ms = _interp(costs["verify_ms"], total + 1) + d * _interp(costs["draft_step_ms"], k) + overhead_ms
                table.append({"top_k": k, "depth": d, "total_tokens": total, "expected_tau": round(tau, 3),
                              "round_ms": round(round_ms, 3), "tokens_per_s": round(1000 * tau / round_ms, 2)})
    table.sort(key=lambda r: -r["tokens_per_s"])
    best = table[0]
    return engine.TreeSettings(best["top_k"], best["depth"], best["total_tokens"]), table


def cache_key(target, draft) -> str:
    device = torch.cuda.get_device_name(0) if target.device.type == "cuda" else f"cpu-{os.cpu_count()}"
    h = hashlib.sha1()
    for t in draft.state_dict().values():
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    # The version changes whenever the engine's costs or the grid change, so that choices
    # measured by an older engine are measured again.
    return (f"{device}|{Path(target.name).name}|{h.hexdigest()[:12]}|threads={torch.get_num_threads()}"
            f"|v{AUTOTUNE_VERSION}")


def auto_tree(target, draft, examples=None, use_cache: bool = True, progress=None) -> dict:
    """Measure and choose the tree for this device, model and draft (cached).
    Returns {"tree": TreeSettings fields, "why": text, "grid": top rows, "costs": ...}."""
    key = cache_key(target, draft)
    cache = {}
    if use_cache and CACHE_PATH.is_file():
        try:
            cache = json.loads(CACHE_PATH.read_text())
        except ValueError:
            cache = {}
        if _usable(cache.get(key)):
            return cache[key]
    if examples is None:
        from .distill import held_out_examples
        examples = held_out_examples(4, seed=engine_seed())
    if progress:
        progress("timing the target and the draft on this device")
    costs = measure_costs(target, draft, examples[0])
    if progress:
        progress("measuring the draft's acceptance")
    rounds = calibrate(target, draft, examples)
    best, table = choose_tree(rounds, costs)
    top = table[0]
    why = (f"top_k {best.top_k}, depth {best.depth}, {best.total_tokens} nodes: expected tau {top['expected_tau']} "
           f"per {top['round_ms']:.1f} ms round = {top['tokens_per_s']:.0f} tok/s "
           f"(verify {costs['verify_ms'][1]:.1f} ms for 1 node vs {_interp(costs['verify_ms'], best.total_tokens + 1):.1f}"
           f" ms for {best.total_tokens + 1}; {len(rounds)} calibration rounds)")
    result = {"tree": asdict(best), "why": why, "grid": table[:10],
              "costs": {k: {str(n): round(v, 3) for n, v in t.items()} for k, t in costs.items()}}
    if use_cache:
        cache[key] = result
        try:
            CACHE_PATH.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE_PATH.with_name(CACHE_PATH.name + ".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(CACHE_PATH)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return result


def _usable(entry) -> bool:
    """A cached choice this engine can run (an entry written by another version, or
    edited by hand, is measured again rather than failing)."""
    try:
        engine.TreeSettings(**entry["tree"]).validate()
    except (TypeError, KeyError, ParameterError):
        return False
    return True


def engine_seed() -> int:
    """Held-out prompts for calibration, disjoint from training and tau evaluation."""
    from . import world
    return world.EVAL_SEED + 7 * 10**6
