"""SpecVLM's elastic visual compressor, on the draft's side only.

The target always sees every visual token, so decoding stays lossless; the draft sees
a compressed visual sequence, which makes its prefill (and every later step's
attention) cheaper. Primitives, all over the draft's visual positions:

- prune_random / prune_guided: keep 1/ratio of the tokens (at random, or those most
  distinct from the image's mean token: on mostly-empty scenes the background is
  dropped first);
- pool: average over k x k cells of the token grid (and pairs of frames for clips);
- conv: a learned strided depthwise convolution over the grid, then a linear mix;
- resampler: a few learned queries cross-attending to all visual tokens (Q-Former);
- text_only: no visual tokens at all; none: no compression (plain EagleVLM).

Modes: "select" (the paper's dynamic selection: a question-aware gate picks one
(primitive, ratio) option per input: Gumbel-softmax while training, argmax at
inference), "weighted" (the gate mixes prune, pool and conv at one ratio), "concat"
(multi-granularity: pool and resampler outputs side by side), or a fixed option name
such as "pool:4".

Beyond the paper, the gate chooses the ratio as well, and it is trained towards the
option with the best trade-off for each input: the distillation trainer measures, on
one example per batch, the draft's loss on the answer tokens under every option, and
the gate learns (cross-entropy) to pick argmin_i loss_i + lambda_cost * kept_tokens_i *
ms_per_token, where ms_per_token is the draft's measured prefill cost per visual token
(`best_option`). Large inputs (high-resolution images, long clips) make low ratios
expensive, so they get compressed harder; inputs whose answers need the pixels keep
more of them. (The alternative, gate_supervision="cost", trains the gate only through
the straight-through estimator plus the expected cost lambda_cost * sum_i P(i) * cost_i;
with one option tried per example it cannot compare options and drifts to the cheapest.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParameterError

# (primitive, ratio) options the gate chooses among, "name:ratio".
DEFAULT_OPTIONS = ("none:1", "prune_guided:4", "prune_guided:16", "prune_random:4", "pool:4", "pool:16",
                   "conv:4", "resampler:2", "text_only:0")
MODES = ("select", "weighted", "concat")


@dataclass(frozen=True)
class Option:
    primitive: str
    ratio: float

    @classmethod
    def parse(cls, text: str) -> "Option":
        name, _, ratio = text.partition(":")
        if name not in ("none", "prune_random", "prune_guided", "pool", "conv", "resampler", "text_only"):
            raise ParameterError(f"unknown compressor primitive {name!r}")
        return cls(name, float(ratio or 1))

    def __str__(self) -> str:
        return f"{self.primitive}:{self.ratio:g}"


def grid_for(n_tokens: int, grid: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(t, h, w) of the visual tokens; a near-square 2D guess when the family's layout
    is unknown (the tokens are then treated as a row-major grid)."""
    if grid is not None and grid[0] * grid[1] * grid[2] == n_tokens:
        return grid
    w = max(1, int(math.sqrt(n_tokens)))
    while n_tokens % w:
        w -= 1
    return 1, n_tokens // w, w


def pool_kernel(ratio: float, t: int) -> tuple[int, int]:
    """(temporal, spatial) kernel for a pooling ratio: clips pool pairs of frames first."""
    kt = 2 if t > 1 and ratio >= 8 else 1
    ks = max(1, round(math.sqrt(ratio / kt)))
    return kt, ks


def grid_pool(x: torch.Tensor, grid: tuple[int, int, int], kt: int, ks: int) -> torch.Tensor:
    """Average pooling of [N, C] tokens on a (t, h, w) grid -> [M, C] (ceil mode)."""
    t, h, w = grid
    vol = x.T.reshape(1, x.shape[1], t, h, w)
    pooled = F.avg_pool3d(vol, (min(kt, t), min(ks, h), min(ks, w)), ceil_mode=True)
    return pooled.reshape(x.shape[1], -1).T


def kept_cells(index: torch.Tensor, grid: tuple[int, int, int]) -> list[list[int]]:
    """[(frame, row, col)] of kept token indices, for overlays in the UI."""
    t, h, w = grid
    return [[int(i) // (h * w), (int(i) % (h * w)) // w, int(i) % w] for i in index.tolist()]


class VisualCompressor(nn.Module):
    """All primitives plus the question-aware gate. Sizes: hidden H (the draft's)."""

    def __init__(self, hidden: int, mode: str = "select", options=DEFAULT_OPTIONS, conv_ratio: int = 4,
                 resampler_queries: int = 2, heads: int = 4, lambda_cost: float = 0.01,
                 ms_per_token: float = 0.01, explore: float = 0.5):
        super().__init__()
        if mode not in MODES and ":" not in mode:
            raise ParameterError(f"compressor mode must be one of {MODES} or 'primitive:ratio', got {mode!r}")
        self.hidden = hidden
        self.mode = mode
        self.options = [Option.parse(o) for o in ([mode] if ":" in mode else options)]
        self.conv_ratio = conv_ratio
        self.lambda_cost = lambda_cost
        self.ms_per_token = ms_per_token
        self.explore = explore
        k = max(1, round(math.sqrt(conv_ratio)))
        self.conv = nn.Conv2d(2 * hidden, 2 * hidden, kernel_size=k, stride=k, groups=2 * hidden)
        self.conv_mix = nn.Linear(2 * hidden, 2 * hidden)
        self.queries = nn.Parameter(torch.randn(resampler_queries, hidden) * 0.02)
        self.resampler = nn.MultiheadAttention(hidden, heads, batch_first=True)
        # Gate: [question summary; visual mean; visual std; log token count] -> options.
        self.gate = nn.Sequential(nn.Linear(3 * hidden + 1, hidden), nn.GELU(),
                                  nn.Linear(hidden, len(self.options) if mode != "weighted" else 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / self.conv.weight[0].numel())  # starts as average pooling
            self.conv.bias.zero_()
            self.conv_mix.weight.copy_(torch.eye(2 * self.hidden))
            self.conv_mix.bias.zero_()

    def config_dict(self) -> dict:
        return {"mode": self.mode, "options": [str(o) for o in self.options], "conv_ratio": self.conv_ratio,
                "resampler_queries": int(self.queries.shape[0]), "heads": self.resampler.num_heads,
                "lambda_cost": self.lambda_cost, "ms_per_token": self.ms_per_token, "explore": self.explore}

    # -------------------------------------------------------------- primitives
    def apply_option(self, option: Option, emb: torch.Tensor, feat: torch.Tensor, grid) -> tuple:
        """emb, feat: [N, H] visual positions -> ([M, H], [M, H], source index [M] (-1 for
        synthesised tokens), kept cells or None)."""
        n = emb.shape[0]
        none = torch.full((0,), -1, dtype=torch.long)
        p = option.primitive
        if p == "none":
            return emb, feat, torch.arange(n), None
        if p == "text_only":
            return emb[:0], feat[:0], none, []
        if p in ("prune_random", "prune_guided"):
            keep = max(1, math.ceil(n / option.ratio))
            if p == "prune_random":
                gen = torch.Generator().manual_seed(n)  # reproducible at inference
                idx = torch.randperm(n, generator=gen)[:keep]
            else:
                distinct = (emb.float() - emb.float().mean(0, keepdim=True)).norm(dim=-1)
                idx = distinct.topk(keep).indices.cpu()
            idx = idx.sort().values
            return emb[idx.to(emb.device)], feat[idx.to(emb.device)], idx, kept_cells(idx, grid)
        if p == "pool":
            kt, ks = pool_kernel(option.ratio, grid[0])
            both = grid_pool(torch.cat([emb, feat], -1), grid, kt, ks)
        elif p == "conv":
            t, h, w = grid
            both = torch.cat([emb, feat], -1).T.reshape(2 * self.hidden, t, h, w).transpose(0, 1)
            k = self.conv.kernel_size[0]
            if h < k or w < k:  # too small to convolve: pad up to one kernel
                both = F.pad(both, (0, max(0, k - w), 0, max(0, k - h)), mode="replicate")
            both = self.conv(both)  # [t, 2H, h', w']
            both = self.conv_mix(both.permute(0, 2, 3, 1).reshape(-1, 2 * self.hidden))
        elif p == "resampler":
            q = self.queries.to(emb.dtype)[None]
            out, weights = self.resampler(q, emb[None], emb[None], need_weights=True)
            # The features of the new positions: the same attention over the features.
            both = torch.cat([out[0], weights[0] @ feat], -1)
        else:
            raise ParameterError(f"unknown primitive {p}")
        m = both.shape[0]
        return both[:, :self.hidden], both[:, self.hidden:], torch.full((m,), -1, dtype=torch.long), None

    # -------------------------------------------------------------------- gate
    def gate_logits(self, emb, feat, visual_mask, n_visual: int) -> torch.Tensor:
        text = feat[~visual_mask]
        question = text.float().mean(0) if text.shape[0] else feat.float().new_zeros(feat.shape[1])
        vis = emb[visual_mask].float()
        summary = torch.cat([question, vis.mean(0), vis.std(0, unbiased=False),
                             torch.tensor([math.log1p(n_visual)], device=vis.device)])
        return self.gate(summary.to(self.gate[0].weight.dtype)).float()

    def option_costs(self, n: int, grid) -> torch.Tensor:
        """[n_options] the draft's prefill cost of each option's kept tokens, in ms."""
        return torch.tensor([self.kept_tokens(o, n, grid) * self.ms_per_token for o in self.options])

    def best_option(self, option_losses: torch.Tensor, n: int, grid) -> int:
        """The option a gate should pick for one input: the lowest draft loss (nats per
        answer token under that option) + lambda_cost x its prefill cost (ms)."""
        return int((option_losses.float().cpu() + self.lambda_cost * self.option_costs(n, grid)).argmin())

    def kept_tokens(self, option: Option, n: int, grid) -> int:
        if option.primitive == "none":
            return n
        if option.primitive == "text_only":
            return 0
        if option.primitive == "resampler":
            return int(self.queries.shape[0])
        if option.primitive == "pool":
            kt, ks = pool_kernel(option.ratio, grid[0])
            return math.ceil(grid[0] / min(kt, grid[0])) * math.ceil(grid[1] / ks) * math.ceil(grid[2] / ks)
        return max(1, math.ceil(n / option.ratio))

    # ------------------------------------------------------------ the sequence
    def compress_sequence(self, embeds: torch.Tensor, features: torch.Tensor, visual_mask: torch.Tensor,
                          media: dict | None = None, training: bool = False, force: Option | str | None = None):
        """Replace the visual run of the draft's input sequence by its compressed form.

        embeds, features: [S, H]; visual_mask: [S] bool. Returns (embeds' [S', H],
        features' [S', H], info) with info: primitive, ratio, visual_tokens_before/after,
        kept_cells (pruning), gate probabilities, source_index [S'] (original position of
        each output position, -1 for synthesised ones), and while training with the
        gate, cost_loss (the expected prefill-cost term, a scalar tensor).
        force: one option ("pool:4" or an Option) instead of the mode's choice (ablations).
        """
        visual_mask = visual_mask.to(embeds.device)
        idx = visual_mask.nonzero().flatten()
        n = int(idx.numel())
        if n == 0:
            return embeds, features, {"source_index": torch.arange(embeds.shape[0]), "visual_tokens_before": 0,
                                      "visual_tokens_after": 0, "primitive": "none", "ratio": 1}
        start, end = int(idx[0]), int(idx[-1]) + 1  # one contiguous visual run (image or clip)
        grid = grid_for(end - start, (media or {}).get("grid"))
        v_emb, v_feat = embeds[start:end], features[start:end]
        info: dict = {}
        if force is not None:
            option = Option.parse(force) if isinstance(force, str) else force
            out_e, out_f, src, cells = self.apply_option(option, v_emb, v_feat, grid)
            info = {"primitive": option.primitive, "ratio": option.ratio, "forced": True}
        elif self.mode == "weighted":
            out_e, out_f, src, cells, info = self._weighted(v_emb, v_feat, grid, embeds, features, visual_mask,
                                                            training)
        elif self.mode == "concat":
            parts = [self.apply_option(Option("pool", 16), v_emb, v_feat, grid),
                     self.apply_option(Option("resampler", 0), v_emb, v_feat, grid)]
            out_e = torch.cat([p[0] for p in parts])
            out_f = torch.cat([p[1] for p in parts])
            src, cells = torch.full((out_e.shape[0],), -1, dtype=torch.long), None
            info = {"primitive": "concat(pool:16,resampler)", "ratio": n / max(1, out_e.shape[0])}
        else:
            out_e, out_f, src, cells, info = self._select(v_emb, v_feat, grid, embeds, features, visual_mask,
                                                          training)
        src = torch.where(src >= 0, src + start, src)
        new_embeds = torch.cat([embeds[:start], out_e.to(embeds.dtype), embeds[end:]])
        new_features = torch.cat([features[:start], out_f.to(features.dtype), features[end:]])
        source_index = torch.cat([torch.arange(start), src.cpu(), torch.arange(end, embeds.shape[0])])
        info.update({"visual_tokens_before": n, "visual_tokens_after": int(out_e.shape[0]),
                     "grid": list(grid), "source_index": source_index})
        if cells is not None:
            info["kept_cells"] = cells
        return new_embeds, new_features, info

    def _select(self, v_emb, v_feat, grid, embeds, features, visual_mask, training):
        n = v_emb.shape[0]
        cost = None
        if len(self.options) == 1:
            choice, weight, probs = 0, None, torch.ones(1)
        else:
            logits = self.gate_logits(embeds, features, visual_mask, n)
            probs = logits.softmax(-1)
            if training:
                if torch.rand(()) < self.explore:  # keep every primitive trained
                    choice = int(torch.randint(len(self.options), ()))
                    weight = None
                else:
                    hard = F.gumbel_softmax(logits, tau=1.0, hard=True)
                    choice = int(hard.argmax())
                    weight = hard[choice]  # 1.0 forward, straight-through gradient to the gate
                cost = self.lambda_cost * (probs * self.option_costs(n, grid).to(probs.device)).sum()
            else:
                choice, weight = int(probs.argmax()), None
        option = self.options[choice]
        out_e, out_f, src, cells = self.apply_option(option, v_emb, v_feat, grid)
        if weight is not None:
            out_e, out_f = out_e * weight.to(out_e.dtype), out_f * weight.to(out_f.dtype)
        info = {"primitive": option.primitive, "ratio": option.ratio,
                "gate": {str(o): round(float(p), 4) for o, p in zip(self.options, probs.detach())}}
        if cost is not None:
            info["cost_loss"] = cost
        return out_e, out_f, src, cells, info

    def _weighted(self, v_emb, v_feat, grid, embeds, features, visual_mask, training):
        ratio = float(self.conv_ratio)
        parts = [self.apply_option(Option(p, ratio), v_emb, v_feat, grid) for p in ("prune_guided", "pool", "conv")]
        m = min(p[0].shape[0] for p in parts)
        weights = self.gate_logits(embeds, features, visual_mask, v_emb.shape[0]).softmax(-1)
        out_e = sum(w * p[0][:m] for w, p in zip(weights, parts))
        out_f = sum(w * p[1][:m] for w, p in zip(weights, parts))
        info = {"primitive": "weighted(prune,pool,conv)", "ratio": ratio,
                "gate": {k: round(float(w), 4) for k, w in zip(("prune", "pool", "conv"), weights.detach())}}
        return out_e, out_f, torch.full((m,), -1, dtype=torch.long), None, info


def build_compressor(config: dict, hidden: int) -> VisualCompressor:
    """A compressor from its saved config (see VisualCompressor.config_dict)."""
    allowed = {"mode", "options", "conv_ratio", "resampler_queries", "heads", "lambda_cost", "ms_per_token",
               "explore"}
    return VisualCompressor(hidden, **{k: v for k, v in config.items() if k in allowed})


def parameter_table(hidden: int) -> list[dict]:
    """Parameters and FLOPs per primitive for N visual tokens of width H (multiply-adds
    x 2), as functions of N: the rows give the counts for H and the formula."""
    c = VisualCompressor(hidden)
    conv_params = sum(p.numel() for p in c.conv.parameters()) + sum(p.numel() for p in c.conv_mix.parameters())
    res_params = c.queries.numel() + sum(p.numel() for p in c.resampler.parameters())
    gate_params = sum(p.numel() for p in c.gate.parameters())
    h, q = hidden, c.queries.shape[0]
    k2 = c.conv.kernel_size[0] ** 2
    return [
        {"primitive": "prune_random", "params": 0, "flops": "0 (index select)"},
        {"primitive": "prune_guided", "params": 0, "flops": f"~{3 * h}*N (distance to mean + top-k)"},
        {"primitive": "pool", "params": 0, "flops": f"{2 * h}*N (2H channels averaged)"},
        {"primitive": "conv", "params": conv_params,
         "flops": f"{2 * 2 * h * k2 // k2}*N + {2 * (2 * h) ** 2}*N/{k2} (depthwise + mix)"},
        {"primitive": "resampler", "params": res_params,
         "flops": f"{2 * 2 * h * h}*N + {2 * q * h * 2}*N + {2 * 2 * q * h * h} (k/v proj, attention, q/out)"},
        {"primitive": "text_only", "params": 0, "flops": "0"},
        {"primitive": "gate", "params": gate_params, "flops": f"{2 * (3 * h + 1) * h + 2 * h * 9} + {4 * h}*N"},
    ]
