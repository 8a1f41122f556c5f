"""The speculative decoding loop, and the plain autoregressive baseline beside it.

Read top to bottom: sampling helpers, the pure acceptance rules, KV-cache compaction,
the target-side forwards (prefill, verify, one step), the EagleVLM drafter, then the
two generators `speculative_stream` and `autoregressive_stream`, which yield one
`RoundEvent` per verification round (per token for the baseline) so the CLI, the app
and the benchmarks consume a single format.

Lossless by construction: every emitted token is chosen from the *target's* logits by
the same rule plain decoding uses (argmax, or a sample from the same processed
distribution); the draft only decides which candidates get checked in one forward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import ParameterError
from .models import record_decoder_io
from .tree import DraftTree, children_lists, expand_frontier, select_tree, tree_attention_mask


# ---------------------------------------------------------------------- settings

@dataclass
class SamplingSettings:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seed: int = 0

    def validate(self, max_tokens_limit: int = 8192) -> None:
        if not (self.temperature >= 0):
            raise ParameterError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ParameterError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ParameterError(f"top_k must be >= 0, got {self.top_k}")
        if not (1 <= self.max_new_tokens <= max_tokens_limit):
            raise ParameterError(f"max_new_tokens must be between 1 and {max_tokens_limit}, got {self.max_new_tokens}")


@dataclass
class TreeSettings:
    """top_k children per expansion, depth levels below the root, total_tokens draft
    nodes sent to the target besides the root."""
    top_k: int = 4
    depth: int = 6
    total_tokens: int = 16

    def validate(self) -> None:
        for name, value, lo, hi in (("tree top_k", self.top_k, 1, 64), ("tree depth", self.depth, 1, 32),
                                    ("tree total_tokens", self.total_tokens, 1, 512)):
            if not isinstance(value, int) or not (lo <= value <= hi):
                raise ParameterError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass
class RoundEvent:
    """What happened in one verification round (or one plain decoding step).

    tree: the draft tree as lists (tokens, parents, depths, scores), None for plain
    decoding; accepted_nodes: tree node indices of the accepted path, root first;
    new_tokens: tokens emitted this round (accepted drafts, then the bonus token).
    """
    method: str
    round: int
    new_tokens: list[int]
    new_text: str
    text: str
    total_tokens: int
    elapsed_s: float
    prefill_ms: float = 0.0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    overhead_ms: float = 0.0
    tree: dict | None = None
    accepted_nodes: list[int] = field(default_factory=list)
    bonus_token: int | None = None
    target_choice: list[int] | None = None  # greedy: the target's argmax after each tree node
    finished: bool = False
    finish_reason: str | None = None
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------ sampling rules

def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Processed target distribution [..., V] for temperature > 0 (same as HF's
    temperature -> top-k -> top-p warper order)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits.softmax(-1)


def pick_token(logits: torch.Tensor, sampling: SamplingSettings, generator: torch.Generator | None) -> int:
    """One token from one row of target logits [V] by the plain decoding rule."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def accept_greedy(tree_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor):
    """Longest path whose every node is the target's argmax at its parent.

    tree_tokens, parents: [n]; target_logits: [n, V] (row i = target's next-token logits
    after node i). Returns (accepted node indices, root first; bonus token).
    """
    predicted = target_logits.argmax(-1).tolist()
    tokens = tree_tokens.tolist()
    children = children_lists(parents)
    path = [0]
    while True:
        want = predicted[path[-1]]
        nxt = next((c for c in children[path[-1]] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)


def accept_sampling(tree_tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None):
    """Tree speculative sampling with deterministic drafts (q = 1 for the tried token).

    At a node with target distribution p, try its children in order: child x is
    accepted with probability p(x); on rejection p(x) := 0 and p is renormalised. If
    every child is rejected, the bonus token is sampled from what remains of p; if a
    leaf is reached, from the leaf's p. The emitted sequence has exactly the target's
    distribution. target_probs: [n, V] processed (temperature/top-k/top-p) distributions.
    Returns (accepted node indices, root first; bonus token). The generator is a CPU
    one (see _prefill_and_first_token), so each row is drawn from on the CPU.
    """
    tokens = tree_tokens.tolist()
    children = children_lists(parents)
    path = [0]
    while True:
        p = target_probs[path[-1]].to("cpu", torch.float32, copy=True)
        moved = False
        for child in children[path[-1]]:
            x = tokens[child]
            px = float(p[x])
            if px > 0 and float(torch.rand((), generator=generator)) < px:
                path.append(child)
                moved = True
                break
            p[x] = 0.0
            total = float(p.sum())
            if total <= 0:  # numerically nothing left: fall back to the untouched mass
                break
            p = p / total
        if not moved:
            return path, int(torch.multinomial(p, 1, generator=generator))


# ------------------------------------------------------------- KV-cache compaction

def compact_kv(tensor: torch.Tensor, context_len: int, keep: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, context_len + len(keep), D]: the context, then the tree
    entries listed in keep (offsets after the context, in path order)."""
    return torch.cat([tensor[:, :, :context_len], tensor[:, :, context_len + keep]], dim=2)


def compact_cache(cache, context_len: int, keep: list[int]) -> None:
    """Apply compact_kv to every layer of a transformers DynamicCache, in place."""
    if keep == list(range(len(keep))):
        # The tree's first nodes (every accepted chain): their entries already follow the
        # context, so the rest is cut off without copying 16 tensors (~0.2 ms a round).
        end = context_len + len(keep)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
        return
    keep_t = None
    for layer in cache.layers:
        if keep_t is None or keep_t.device != layer.keys.device:
            keep_t = torch.tensor(keep, device=layer.keys.device, dtype=torch.long)
        layer.keys = compact_kv(layer.keys, context_len, keep_t)
        layer.values = compact_kv(layer.values, context_len, keep_t)


# ------------------------------------------------------------------- target side

class TargetRunner:
    """Forwards of one target for one request: prefill, tree verification, one step.

    Uses only the public API: explicit position ids (3 rows for Qwen2-VL's M-RoPE),
    a 4D float attention mask for trees, and a DynamicCache. Two hooks read (never
    change) the language model's input embeddings, which the draft needs for visual
    tokens, and its final hidden states, which are the features the lm_head reads.
    """

    def __init__(self, target):
        self.target = target
        self.model = target.model
        self.cache = None
        self.length = 0
        self.rope_delta = 0
        self._captured: dict = {}

    def _positions(self, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.to(self.target.device)
        if self.target.family == "qwen2_vl":
            return (positions + self.rope_delta).view(1, 1, -1).expand(3, 1, -1)
        return positions.view(1, -1)

    def _forward(self, **kwargs):
        with record_decoder_io(self.model) as record, torch.no_grad():
            out = self.model(**kwargs, use_cache=True, return_dict=True)
        self._captured = record
        return out

    def prefill(self, inputs: dict):
        """Run the prompt. Returns (last logits [V], features [S, H], input embeds [S, H])."""
        from transformers import DynamicCache
        inputs = dict(inputs)
        seq_len = inputs["input_ids"].shape[1]
        if self.target.family == "qwen2_vl":
            if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
                self.rope_delta = 0  # text only: M-RoPE reduces to plain positions
                inputs["position_ids"] = self._positions(torch.arange(seq_len))
            else:
                position_ids, deltas = self._rope_index(inputs)
                inputs["position_ids"] = position_ids
                self.rope_delta = int(deltas.reshape(-1)[0])
        self.cache = DynamicCache(config=self.model.config)
        out = self._forward(**inputs, past_key_values=self.cache, logits_to_keep=1)
        self.length = seq_len
        return out.logits[0, -1], self._captured["features"][0], self._captured["embeds"][0]

    def _rope_index(self, inputs: dict):
        import inspect
        fn = self.model.model.get_rope_index
        accepted = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in inputs.items() if k in accepted and k != "input_ids"}
        return fn(inputs["input_ids"], **kwargs)

    def verify(self, tree: DraftTree):
        """One forward over all tree nodes. Returns (logits [n, V], features [n, H]);
        the cache grows by n entries (compact it with accept())."""
        mask = tree_attention_mask(tree.parents, self.length, dtype=self.target.dtype).to(self.target.device)
        ids = tree.tokens.view(1, -1).to(self.target.device)
        out = self._forward(input_ids=ids, attention_mask=mask, past_key_values=self.cache,
                            position_ids=self._positions(self.length + tree.depths))
        return out.logits[0], self._captured["features"][0]

    def accept(self, accepted_nodes: list[int]) -> None:
        """Keep the accepted nodes' cache entries right after the context, drop the rest."""
        compact_cache(self.cache, self.length, accepted_nodes)
        self.length += len(accepted_nodes)

    def step(self, token: int):
        """Plain decoding step. Returns (logits [V], features [H])."""
        ids = torch.tensor([[token]], device=self.target.device)
        out = self._forward(input_ids=ids, past_key_values=self.cache,
                            position_ids=self._positions(torch.tensor([self.length])))
        self.length += 1
        return out.logits[0, -1], self._captured["features"][0, -1]


# -------------------------------------------------------------------- draft side

def direct_call(module: torch.nn.Module):
    """The function a plain nn.Embedding (ids [n] -> [n, H]) or nn.Linear computes, on
    its weights directly; any other module (a scaled embedding, say) as it is.

    A chain calls the target's embedding and lm_head once per level, and on a CPU at
    batch 1 a transformers module's call costs more than the lookup or the matmul
    (about 20 us of a 200 us level each)."""
    if type(module) is torch.nn.Embedding and module.max_norm is None:
        weight = module.weight
        return lambda ids: weight[ids]
    if type(module) is torch.nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: torch.nn.functional.linear(x, weight, bias)
    return module


class EagleDrafter:
    """Drives an EagleDraft for one request: prefill, tree proposal, commit.

    Draft position p pairs the target feature f(p) with the embedding of token p+1. The
    committed prefix lives in cache slots [0, length); tree nodes use slots after it
    and are forgotten when the next commit overwrites them.
    """

    def __init__(self, draft, target, compressor="draft", force_option=None):
        """compressor: "draft" (the draft's own, the default), None (no compression:
        plain EagleVLM) or a VisualCompressor for this request only; force_option
        bypasses the gate with one compressor option (ablations). Nothing on the shared
        draft is changed, so concurrent requests can use different settings."""
        self.draft = draft
        self.compressor = draft.compressor if compressor == "draft" else compressor
        self.force_option = force_option
        self.embed = direct_call(target.model.get_input_embeddings())
        self.lm_head = direct_call(target.model.get_output_embeddings())
        self.stop_ids = set(target.eos_token_ids())
        self.length = 0
        self.cache = None  # this request's DraftCache
        self.last_output: torch.Tensor | None = None  # draft feature after the root [H]
        self.info: dict = {}

    def _logprobs(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(features).float().log_softmax(-1)

    def start(self, features: torch.Tensor, embeds: torch.Tensor, first_token: int, visual_mask=None,
              media=None, prompt_ids=None) -> None:
        """Draft prefill. features, embeds: [S, H] from the target's prefill; the token
        after the prompt is first_token. visual_mask [S] marks visual prompt tokens (for
        the compressor, when the draft has one). prompt_ids is unused here (the
        drafter interface shares it with PromptLookupDrafter)."""
        shifted = torch.cat([embeds[1:], self.embed(torch.tensor([first_token], device=embeds.device))])
        if self.compressor is not None and visual_mask is not None:
            # Draft position p holds the embedding of token p+1.
            shifted_visual = torch.cat([visual_mask[1:], visual_mask.new_zeros(1)])
            shifted, features, self.info = self.compressor.compress_sequence(
                shifted, features, shifted_visual, media, force=self.force_option)
        n = features.shape[0]
        self.cache = self.draft.new_cache(n + 1024)
        self.length = 0
        self._commit(shifted, features)

    def _commit(self, embeds: torch.Tensor, features: torch.Tensor) -> None:
        n = features.shape[0]
        slots = torch.arange(self.length, self.length + n, device=features.device)
        visible = torch.ones(n, self.length + n, dtype=torch.bool, device=features.device).tril(self.length)
        out = self.draft.step(embeds, features, slots, slots, visible, self.cache)
        self.length += n
        self.last_output = out[-1]

    def commit(self, tokens: list[int], features: torch.Tensor) -> None:
        """After verification: tokens [m] = accepted drafts + bonus, features [m, H] =
        the target's features at the root and the accepted nodes."""
        ids = torch.tensor(tokens, device=features.device)
        self._commit(self.embed(ids), features)

    @torch.no_grad()
    def propose(self, root_token: int, tree: TreeSettings) -> DraftTree:
        """Grow a dynamic tree of at most tree.total_tokens nodes below root_token (a
        chain when tree.top_k is 1)."""
        if tree.top_k == 1:
            return self._propose_chain(root_token, min(tree.depth, tree.total_tokens))
        return self._propose_tree(root_token, tree)

    @torch.no_grad()
    def _propose_tree(self, root_token: int, tree: TreeSettings) -> DraftTree:
        """The general EAGLE-2 expansion (any top_k; it does not stop at end-of-turn
        tokens, see _propose_chain).

        Level 1 comes from the draft's output at the root; each further level runs the
        draft once on the top_k frontier nodes (slots after the committed prefix, one
        block of top_k slots per level) and keeps the global top_k children by
        cumulative log-prob. Bookkeeping is tensor-only: each frontier row carries its
        visibility over the tree slots, inherited from its parent row.
        """
        device = self.last_output.device
        k = tree.top_k
        base = self.length
        tokens, scores, frontier = expand_frontier(torch.zeros(1, device=device),
                                                   self._logprobs(self.last_output[None]), k)
        cand_tokens, cand_scores = [tokens.reshape(-1)], [scores.reshape(-1)]
        cand_parents = [torch.full((tokens.numel(),), -1, dtype=torch.long, device=device)]
        cand_depths = [torch.zeros(tokens.numel(), dtype=torch.long, device=device)]
        n_tree_slots = k * max(0, tree.depth - 1)
        # frontier_vis[r, j]: frontier row r may attend to tree slot base + j.
        frontier_vis = torch.zeros(frontier.numel(), n_tree_slots, dtype=torch.bool, device=device)
        frontier_ids = frontier  # candidate indices of the frontier
        frontier_features = self.last_output[None].expand(frontier.numel(), -1)
        frontier_scores = scores.reshape(-1)[frontier]
        prefix_vis = torch.ones(k, base, dtype=torch.bool, device=device)
        n_cands = tokens.numel()
        frontier_tokens = tokens.reshape(-1)[frontier]
        rows = torch.arange(k, device=device)  # frontier rows, and their slot offsets in a level's block
        weights = self.draft.inference_weights()
        for level in range(1, tree.depth):
            n = frontier_ids.numel()
            first = (level - 1) * k
            frontier_vis[rows[:n], first + rows[:n]] = True
            visible = torch.cat([prefix_vis[:n], frontier_vis[:, :first + n]], dim=1)
            out = self.draft.step(self.embed(frontier_tokens), frontier_features,
                                  torch.full((n,), base - 1 + level, device=device), base + first + rows[:n], visible,
                                  self.cache, weights)
            child_tokens, child_scores, nxt = expand_frontier(frontier_scores, self._logprobs(out), k)
            per_parent = child_tokens.shape[1]
            cand_tokens.append(child_tokens.reshape(-1))
            cand_scores.append(child_scores.reshape(-1))
            cand_parents.append(frontier_ids.repeat_interleave(per_parent))
            cand_depths.append(torch.full((child_tokens.numel(),), level, dtype=torch.long, device=device))
            parent_rows = nxt // per_parent
            frontier_features = out[parent_rows]
            frontier_vis = frontier_vis[parent_rows]
            frontier_scores = child_scores.reshape(-1)[nxt]
            frontier_tokens = child_tokens.reshape(-1)[nxt]
            frontier_ids = nxt + n_cands
            n_cands += child_tokens.numel()
        return select_tree(root_token, torch.cat(cand_tokens).cpu(), torch.cat(cand_scores).cpu(),
                           torch.cat(cand_parents).cpu(), tree.total_tokens, torch.cat(cand_depths).cpu())

    @torch.no_grad()
    def _propose_chain(self, root_token: int, length: int) -> DraftTree:
        """top_k == 1: the tree is a chain, the draft's greedy continuation of `length`
        tokens, or up to its first end-of-turn token: nothing after one is ever emitted,
        so drafting and verifying more would only cost time in an answer's last round.
        The general loop builds the same tree when no end-of-turn token is drafted
        (select_tree keeps a chain's first `total_tokens` nodes, in order), but its
        bookkeeping for visibility rows, parents and candidate lists costs about half a
        draft step per level on a CPU; here a level is the draft step, the lm_head and
        one argmax. Node l (1-based) sits in tree slot base + l - 1 and sees the whole
        prefix and the nodes above it."""
        device = self.last_output.device
        base = self.length
        # One allocation for every level's positions: a view of it is all a level needs
        # (level l sees every slot before base + l: no mask).
        positions = torch.arange(base, base + length, device=device)
        weights = self.draft.inference_weights()
        feature = self.last_output[None]
        # A level needs only the argmax; the path's log-probs are taken once at the end.
        logits = [self.lm_head(feature)]
        tokens = [logits[0][0].argmax()]
        for level in range(1, length):
            if int(tokens[-1]) in self.stop_ids:
                break
            feature = self.draft.step(self.embed(tokens[-1].view(1)), feature, positions[level - 1:level],
                                      positions[level - 1:level], base + level, self.cache, weights)
            logits.append(self.lm_head(feature))
            tokens.append(logits[-1][0].argmax())
        chain = torch.stack(tokens)
        logprobs = torch.cat(logits).float().log_softmax(-1).gather(1, chain[:, None])[:, 0]
        length = len(tokens)
        return DraftTree(tokens=torch.cat([torch.tensor([root_token]), chain.cpu()]),
                         parents=torch.arange(-1, length), depths=torch.arange(length + 1),
                         scores=torch.cat([torch.tensor([0.0]), logprobs.cumsum(0).cpu()]))


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting with the EagleDrafter interface, as a baseline.

    The draft is a chain: the tokens that followed the most recent earlier occurrence
    of the last n tokens (n = max_ngram down to 1) in the prompt and the text so far.
    Same idea as transformers' `prompt_lookup_num_tokens`, but run by this engine, so it
    works on every family: visual placeholder tokens never match and are never
    proposed (copying them is what breaks transformers' own version on Qwen2-VL).
    No network, no weights: a chain of up to num_tokens nodes, verified like a tree.
    """

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3):
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.history: list[int] = []  # prompt (visual tokens as -1) + emitted tokens
        self.info: dict = {}

    def start(self, features, embeds, first_token: int, visual_mask=None, media=None, prompt_ids=None) -> None:
        ids = prompt_ids.tolist() if prompt_ids is not None else []
        if visual_mask is not None and ids:
            ids = [-1 if v else t for t, v in zip(ids, visual_mask.tolist())]
        self.history = ids + [first_token]

    def commit(self, tokens: list[int], features=None) -> None:
        self.history.extend(tokens)

    def lookup(self) -> list[int]:
        """The continuation of the latest earlier match of the longest matching suffix."""
        seq = self.history
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            suffix = seq[-n:]
            if -1 in suffix:
                continue
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start:start + n] == suffix:
                    follow = []
                    for t in seq[start + n:start + n + self.num_tokens]:
                        if t < 0:
                            break
                        follow.append(t)
                    if follow:
                        return follow
        return []

    def propose(self, root_token: int, tree: TreeSettings | None = None) -> DraftTree:
        """A chain below the root (tree settings are ignored: lookup has no scores)."""
        chain = self.lookup()
        n = len(chain)
        return DraftTree(tokens=torch.tensor([root_token] + chain), parents=torch.arange(-1, n),
                         depths=torch.arange(n + 1), scores=torch.zeros(n + 1))


# ---------------------------------------------------------------------- the loops

class _Emitter:
    """Stopping rules shared by both loops: EOS ends the turn (the EOS is kept and
    nothing after it is emitted), max_new_tokens truncates."""

    def __init__(self, target, sampling: SamplingSettings):
        self.tokenizer = target.tokenizer
        self.eos = set(target.eos_token_ids())
        self.max_new = sampling.max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def emit(self, new: list[int]) -> tuple[list[int], str]:
        kept = []
        for t in new:
            if self.finish_reason:
                break
            kept.append(t)
            self.tokens.append(t)
            if t in self.eos:
                self.finish_reason = "eos"
            elif len(self.tokens) >= self.max_new:
                self.finish_reason = "length"
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        new_text, self.text = text[len(self.text):] if text.startswith(self.text) else text, text
        return kept, new_text


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def sync_device(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Start:
    """What both loops do first, identically: prefill and the first token."""
    gen: torch.Generator
    runner: TargetRunner
    emitter: "_Emitter"
    start: float
    prefill_ms: float
    token: int
    features: torch.Tensor
    embeds: torch.Tensor


def _prefill_and_first_token(target, inputs: dict, sampling: SamplingSettings) -> _Start:
    sampling.validate()
    # A CPU generator on every device: a seed draws the same random stream on a CPU and
    # a GPU (tokens are drawn from CPU copies of the probabilities, see pick_token).
    gen = torch.Generator().manual_seed(sampling.seed)
    runner = TargetRunner(target)
    emitter = _Emitter(target, sampling)
    start = time.perf_counter()
    logits, features, embeds = runner.prefill(inputs)
    token = pick_token(logits, sampling, gen)
    sync_device(target.device)
    return _Start(gen, runner, emitter, start, _ms(start), token, features, embeds)


def autoregressive_stream(target, inputs: dict, sampling: SamplingSettings) -> Iterator[RoundEvent]:
    """Plain decoding with the same preprocessing, cache and stopping rules; one event
    per token."""
    s = _prefill_and_first_token(target, inputs, sampling)
    token, step = s.token, 0
    while True:
        kept, new_text = s.emitter.emit([token])
        yield RoundEvent("ar", step, kept, new_text, s.emitter.text, len(s.emitter.tokens),
                         time.perf_counter() - s.start, prefill_ms=s.prefill_ms if step == 0 else 0.0,
                         finished=s.emitter.finish_reason is not None, finish_reason=s.emitter.finish_reason)
        if s.emitter.finish_reason:
            return
        logits, _ = s.runner.step(token)
        token = pick_token(logits, sampling, s.gen)
        step += 1


def speculative_stream(target, drafter: "EagleDrafter | PromptLookupDrafter", inputs: dict,
                       sampling: SamplingSettings, tree: TreeSettings, media=None) -> Iterator[RoundEvent]:
    """Speculative decoding; one event per verification round (the first event is the
    token the prefill produces, exactly as in plain decoding)."""
    tree.validate()
    s = _prefill_and_first_token(target, inputs, sampling)
    gen, runner, emitter, start, prefill_ms = s.gen, s.runner, s.emitter, s.start, s.prefill_ms
    root, features, embeds = s.token, s.features, s.embeds
    kept, new_text = emitter.emit([root])
    yield RoundEvent("spec", 0, kept, new_text, emitter.text, len(emitter.tokens), time.perf_counter() - start,
                     prefill_ms=prefill_ms, finished=emitter.finish_reason is not None,
                     finish_reason=emitter.finish_reason)
    if emitter.finish_reason:
        return
    t0 = time.perf_counter()
    media = {**(media or {}), "grid": visual_grid(target, inputs)}
    drafter.start(features, embeds, root, visual_mask=visual_mask(target, inputs), media=media,
                  prompt_ids=inputs["input_ids"][0])
    draft_prefill_ms = _ms(t0)
    round_no = 0
    while True:
        round_no += 1
        t_round = time.perf_counter()
        draft_tree = drafter.propose(root, tree)
        sync_device(target.device)
        draft_ms = _ms(t_round)
        t0 = time.perf_counter()
        tree_logits, tree_features = runner.verify(draft_tree)
        sync_device(target.device)
        verify_ms = _ms(t0)
        t_draft_commit = 0.0
        target_choice = None
        if sampling.temperature == 0:
            path, bonus = accept_greedy(draft_tree.tokens, draft_tree.parents, tree_logits)
            target_choice = tree_logits.argmax(-1).tolist()
        else:
            probs = logits_to_probs(tree_logits, sampling.temperature, sampling.top_k, sampling.top_p)
            path, bonus = accept_sampling(draft_tree.tokens, draft_tree.parents, probs, gen)
        runner.accept(path)
        accepted_tokens = draft_tree.tokens[path[1:]].tolist()
        kept, new_text = emitter.emit(accepted_tokens + [bonus])
        finished = emitter.finish_reason is not None
        if not finished:
            t1 = time.perf_counter()
            drafter.commit(accepted_tokens + [bonus], tree_features[path])
            t_draft_commit = _ms(t1)
        round_ms = _ms(t_round)
        info = _first_round_info(draft_prefill_ms, drafter.info) if round_no == 1 else {}
        yield RoundEvent("spec", round_no, kept, new_text, emitter.text, len(emitter.tokens),
                         time.perf_counter() - start, draft_ms=draft_ms + t_draft_commit, verify_ms=verify_ms,
                         overhead_ms=max(0.0, round_ms - draft_ms - t_draft_commit - verify_ms),
                         tree=draft_tree.as_dict(), accepted_nodes=path, bonus_token=bonus,
                         target_choice=target_choice, finished=finished, finish_reason=emitter.finish_reason, info=info)
        if finished:
            return
        root = bonus


def _first_round_info(draft_prefill_ms: float, compressor_info: dict) -> dict:
    """What the first round reports about the draft's prefill and the compressor
    (JSON-friendly: tensors dropped)."""
    info = {"draft_prefill_ms": round(draft_prefill_ms, 3)}
    for key, value in compressor_info.items():
        if not isinstance(value, torch.Tensor):
            info[key] = value
    before, after = info.get("visual_tokens_before"), info.get("visual_tokens_after")
    if before and after is not None:
        info["tokens_compressed"] = before - after
    return info


def visual_grid(target, inputs: dict) -> tuple[int, int, int] | None:
    """(frames, rows, cols) of the prompt's visual tokens, where the family lays them
    out as a plain grid (Qwen2-VL: grid_thw over the merge size); None otherwise."""
    if target.family != "qwen2_vl":
        return None
    merge = getattr(target.model.config.vision_config, "spatial_merge_size", 2)
    for key in ("image_grid_thw", "video_grid_thw"):
        thw = inputs.get(key)
        if thw is not None and thw.shape[0] == 1:
            t, h, w = (int(v) for v in thw[0])
            return t, h // merge, w // merge
    return None


def visual_mask(target, inputs: dict) -> torch.Tensor:
    """[S] bool: which prompt positions hold visual tokens."""
    ids = inputs["input_ids"][0]
    cfg = target.model.config
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for name in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
        tid = getattr(cfg, name, None)
        if tid is not None:
            mask |= ids == tid
    return mask


# ------------------------------------------------------------------ summaries

@dataclass
class GenerationResult:
    method: str
    token_ids: list[int]
    text: str
    seconds: float
    rounds: int
    prefill_ms: float
    events: list[RoundEvent]
    finish_reason: str | None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_accepted(self) -> float | None:
        """tau: tokens per verification round, bonus included (first prefill token excluded)."""
        rounds = [e for e in self.events if e.round > 0]
        if self.method != "spec" or not rounds:
            return None
        return sum(len(e.new_tokens) for e in rounds) / len(rounds)


def collect(stream: Iterator[RoundEvent]) -> GenerationResult:
    events = list(stream)
    last = events[-1]
    tokens = [t for e in events for t in e.new_tokens]
    return GenerationResult(method=last.method, token_ids=tokens, text=last.text, seconds=last.elapsed_s,
                            rounds=sum(1 for e in events if e.round > 0) if last.method == "spec" else len(events),
                            prefill_ms=events[0].prefill_ms, events=events, finish_reason=last.finish_reason)
