"""EagleVLM: the EAGLE-2 style draft head, in plain torch.

One Llama-style decoder layer over [norm(token embedding) ; norm(target feature)] fused
2H -> H (SpecVLM's input normalisation before the fusion). The token embedding and the
lm_head are the target's own, frozen, and are *not* part of the draft's weights: they
are passed in at run time, so a draft folder stays a few MB.

Each request keeps a preallocated draft KV cache written by position (gpt-fast style,
`DraftCache`): the committed prefix occupies slots [0, length), tree expansion writes
temporary slots after it, and committing accepted tokens simply overwrites those slots.
Nothing is rolled back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DraftMismatchError, ModelLoadError

WEIGHTS_NAME = "draft.safetensors"
CONFIG_NAME = "draft_config.json"


@dataclass
class DraftConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_length: int = 8192
    # Which target this draft belongs to: checked when loading.
    target_name: str = ""
    target_hidden_size: int = 0
    target_vocab_size: int = 0
    compressor: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def for_target(cls, target, **overrides) -> "DraftConfig":
        """A draft shaped like one layer of the target's text decoder."""
        tc = target.text_config
        heads = tc.num_attention_heads
        cfg = dict(hidden_size=tc.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                   intermediate_size=tc.intermediate_size,
                   rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
                   target_name=Path(target.name).name if Path(target.name).exists() else target.name,
                   target_hidden_size=tc.hidden_size, target_vocab_size=target.vocab_size)
        cfg.update(overrides)
        return cls(**cfg)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The training path's norm (step() folds the scale into the next projection).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim] for integer positions [n] (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """[a, b] -> [-b, a] along dim (the rotate-half convention's partner of each entry)."""
    first, second = x.chunk(2, dim=dim)
    return torch.cat([-second, first], dim=dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, n, head_dim]; cos/sin [n, head_dim]."""
    return x * cos + rotate_half(x) * sin


def _unit_rms(x: torch.Tensor, min_norm: float) -> torch.Tensor:
    """x / max(||x||, min_norm) over the last dim: an RMS norm up to its sqrt(dim) and
    its scale, which the inference path folds into the next projection. With min_norm
    = sqrt(dim * eps) it differs from x / sqrt(sum(x^2) + dim * eps) only for rows
    of norm near min_norm, and it is 2 ops instead of 5 (a third of a step's norms)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(min_norm)


@dataclass(frozen=True)
class InferenceWeights:
    """EagleDraft.step's weights (see EagleDraft.inference_weights): fuse [H, 2H],
    qkv [(2 (heads + kv_heads) + kv_heads) * head_dim, H], o_t [heads * head_dim, H],
    gate_up [2 I, H], down_t [I, H]; min_norm = sqrt(rms_norm_eps * H) for _unit_rms."""
    min_norm: float
    fuse: torch.Tensor
    qkv: torch.Tensor
    o_t: torch.Tensor
    gate_up: torch.Tensor
    down_t: torch.Tensor


class DraftCache:
    """A request's preallocated draft KV cache [kv_heads, length, head_dim], written by
    slot. It belongs to the request (the drafter), not to the shared draft weights, so
    concurrent requests never see each other's state."""

    def __init__(self, kv_heads: int, head_dim: int, length: int, dtype, device):
        self.k = torch.zeros(kv_heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def ensure_capacity(self, length: int) -> None:
        """Grow (doubling) when a long generation outruns the preallocation."""
        if self.k.shape[1] < length:
            pad = max(length, 2 * self.k.shape[1]) - self.k.shape[1]
            self.k = F.pad(self.k, (0, 0, 0, pad))
            self.v = F.pad(self.v, (0, 0, 0, pad))


class EagleDraft(nn.Module):
    """The draft network. Batch size 1 at inference (the engine decodes one request)."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        h, hd = config.hidden_size, config.head_dim
        self.norm_embed = RMSNorm(h, config.rms_norm_eps)
        self.norm_feature = RMSNorm(h, config.rms_norm_eps)
        self.fuse = nn.Linear(2 * h, h, bias=False)
        self.attn_norm = RMSNorm(h, config.rms_norm_eps)
        self.q_proj = nn.Linear(h, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, h, bias=False)
        self.mlp_norm = RMSNorm(h, config.rms_norm_eps)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)
        self.compressor = None  # set by specvlm_core.compressor when the draft has one
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
        # Start close to "copy the target feature": the fusion sees [embed; feature].
        with torch.no_grad():
            h = self.config.hidden_size
            self.fuse.weight[:, h:] += torch.eye(h)

    # ------------------------------------------------------------------ training path
    def forward(self, embeds: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Batched, cache-free pass for training.

        embeds, features: [B, S, H] (embedding of token p+1, target feature at p);
        attention_mask: [B, S] with 1 for real positions (left or right padding).
        Returns the predicted features [B, S, H].
        """
        b, s, h = embeds.shape
        x = self.fuse(torch.cat([self.norm_embed(embeds), self.norm_feature(features)], dim=-1))
        if position_ids is None:
            position_ids = torch.arange(s, device=x.device)
        cos, sin = rotary_tables(position_ids.reshape(-1), self.config.head_dim, self.config.rope_theta, x.dtype)
        cos = cos.view(*position_ids.shape, -1)
        sin = sin.view(*position_ids.shape, -1)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        hd, nh, nkv = self.config.head_dim, self.config.num_heads, self.config.num_kv_heads
        y = self.attn_norm(x)
        q = self.q_proj(y).view(b, s, nh, hd).transpose(1, 2)
        k = self.k_proj(y).view(b, s, nkv, hd).transpose(1, 2)
        v = self.v_proj(y).view(b, s, nkv, hd).transpose(1, 2)
        q = apply_rotary(q, cos[:, None], sin[:, None])
        k = apply_rotary(k, cos[:, None], sin[:, None])
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            mask = mask[None, None] & attention_mask[:, None, None, :].bool()
            # A fully padded query row would give NaN: let it see itself.
            mask = mask | torch.eye(s, dtype=torch.bool, device=x.device)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, s, nh * hd))
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    # ----------------------------------------------------------------- inference path
    def _rotary_table(self, length: int, dtype, device) -> torch.Tensor:
        """[N >= length, 2, head_dim]: cos and sin for positions [0, N), computed once and
        grown by doubling (one gather per step reads both). A pure function of the
        config, so safe to share across requests."""
        table = getattr(self, "_rotary", None)
        if table is None or table.shape[0] < length or table.dtype != dtype or table.device != device:
            n = max(length, 2 * (table.shape[0] if table is not None else 1024))
            cos, sin = rotary_tables(torch.arange(n, device=device), self.config.head_dim, self.config.rope_theta,
                                     dtype)
            table = self._rotary = torch.stack([cos, sin], dim=1)
        return table

    def new_cache(self, length: int = 1024) -> "DraftCache":
        p = self.fuse.weight
        return DraftCache(self.config.num_kv_heads, self.config.head_dim, length, p.dtype, p.device)

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
             slots: torch.Tensor, visible: torch.Tensor | int, cache: "DraftCache",
             weights: "InferenceWeights | None" = None) -> torch.Tensor:
        """Run n new inputs against a request's cache; the same function as forward().

        embeds, features: [n, H]; positions: [n] rotary positions; slots: [n] cache slots
        to write; visible: [n, L] bool, which cache slots (after writing) each input
        attends to, or an int L when every input sees all of slots [0, L) (a chain's
        next level: no mask to build or apply); weights: inference_weights(), fetched
        once by callers that step in a loop (checking that they are current costs as
        much as a tenth of a step). Returns the output features [n, H].

        At batch 1 on a CPU a draft step costs mostly the number of ops, not their size
        (one decoder layer at the target's width), so the weights are pre-arranged
        (`inference_weights`) to make it ~20 ops: norm scales folded into the next
        projection, q, k, their rotate-halves and v in one matmul, the attention
        written out with the kv-head grouping as a batch dimension, residuals as addmm.
        """
        cfg = self.config
        n = embeds.shape[0]
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qk_rows = nh + nkv
        w = weights or self.inference_weights()
        length = visible if isinstance(visible, int) else visible.shape[1]
        cache.ensure_capacity(length)
        # Both input norms in one pass: [embed ; feature] seen as two rows of H.
        x = F.linear(_unit_rms(torch.cat([embeds, features], dim=-1).view(n, 2, -1), w.min_norm).view(n, -1), w.fuse)
        cos_sin = self._rotary_table(cache.k.shape[1], x.dtype, x.device)[positions]  # [n, 2, hd]
        proj = F.linear(_unit_rms(x, w.min_norm), w.qkv).view(n, -1, hd).transpose(0, 1)
        # Rotary: x * cos + rotate_half(x) * sin, with rotate_half(x) already projected.
        qk = torch.addcmul(proj[:qk_rows] * cos_sin[:, 0], proj[qk_rows:2 * qk_rows], cos_sin[:, 1])
        cache.k[:, slots] = qk[nh:]
        cache.v[:, slots] = proj[2 * qk_rows:]
        # Grouped-query attention: query head h uses kv head h // groups, so the queries
        # of one kv head are adjacent rows. The 1/sqrt(head_dim) is in w.qkv.
        groups = nh // nkv
        scores = torch.bmm(qk[:nh].reshape(nkv, groups * n, hd), cache.k[:, :length].transpose(1, 2))
        if not isinstance(visible, int):
            scores = scores.view(nkv, groups, n, length).masked_fill_(~visible, float("-inf")).view(nkv, -1, length)
        attn = torch.bmm(scores.softmax(-1), cache.v[:, :length]).view(nh, n, hd).transpose(0, 1).reshape(n, -1)
        x = torch.addmm(x, attn, w.o_t)
        gate, up = F.linear(_unit_rms(x, w.min_norm), w.gate_up).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate) * up, w.down_t)

    def inference_weights(self) -> "InferenceWeights":
        """The inference path's weights, rebuilt whenever a weight changes (the
        distillation trainer measures tau mid-training).

        rms_norm(x) * g then W is (x / rms) (W * g): each norm's scale g, and the
        sqrt(H) that turns _unit_rms into an RMS norm, go into the next projection's
        columns. rotate_half(W x) = W' x with W' the rows of each head of W rotated, so
        the rotate-halves of q and k come out of the same matmul as q, k and v. The
        cost is memory: a second copy of the layer's weights but o_proj and down_proj
        (read through transposed views), plus q and k once more (rotated)."""
        params = tuple(self.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if getattr(self, "_inference_key", None) == key:
            return self._inference
        cfg = self.config
        h, hd = cfg.hidden_size, cfg.head_dim
        root_h = h ** 0.5

        def rotate_half_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
            return rotate_half(weight.view(heads, hd, -1), dim=1).reshape(heads * hd, -1)

        with torch.no_grad():
            q = self.q_proj.weight * hd ** -0.5
            k, v = self.k_proj.weight, self.v_proj.weight
            qkv = torch.cat([q, k, rotate_half_rows(q, cfg.num_heads), rotate_half_rows(k, cfg.num_kv_heads), v])
            fuse_scale = torch.cat([self.norm_embed.weight, self.norm_feature.weight]) * root_h
            gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])
            self._inference = InferenceWeights(
                min_norm=(h * cfg.rms_norm_eps) ** 0.5,
                fuse=(self.fuse.weight * fuse_scale).contiguous(),
                qkv=(qkv * (self.attn_norm.weight * root_h)).contiguous(),
                o_t=self.o_proj.weight.detach().t(),  # views: addmm reads either layout
                gate_up=(gate_up * (self.mlp_norm.weight * root_h)).contiguous(),
                down_t=self.down_proj.weight.detach().t())
        self._inference_key = key
        return self._inference

    # ------------------------------------------------------------------- persistence
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write draft_config.json and draft.safetensors (atomically: temp file, rename)."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / WEIGHTS_NAME)
        cfg = asdict(self.config)
        if self.compressor is not None:
            cfg["compressor"] = self.compressor.config_dict()
        tmp_cfg = out / (CONFIG_NAME + ".tmp")
        tmp_cfg.write_text(json.dumps(cfg, indent=2))
        tmp_cfg.replace(out / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path, target=None, device=None) -> "EagleDraft":
        """Load a draft folder; with a target, refuse a draft trained for another one."""
        from safetensors.torch import load_file
        folder = Path(path)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise ModelLoadError(f"not a draft folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}): {path}")
        try:
            raw = json.loads((folder / CONFIG_NAME).read_text())
            config = DraftConfig(**raw)
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"draft config is unreadable in {path}: {exc}") from exc
        if target is not None:
            check_draft_matches(config, target)
        draft = cls(config)
        if config.compressor:
            from .compressor import build_compressor
            draft.compressor = build_compressor(config.compressor, config.hidden_size)
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = draft.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"draft weights in {path} do not match its config "
                                 f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
        draft.requires_grad_(False)
        draft.eval()
        if target is not None:
            draft.to(device=target.device, dtype=target.dtype)
        elif device is not None:
            draft.to(device)
        return draft


def check_draft_matches(config: DraftConfig, target) -> None:
    if config.target_hidden_size != target.hidden_size or config.target_vocab_size != target.vocab_size:
        raise DraftMismatchError(
            f"this draft was trained for {config.target_name or 'another model'} (hidden {config.target_hidden_size}, "
            f"vocab {config.target_vocab_size}), not for {target.name} (hidden {target.hidden_size}, "
            f"vocab {target.vocab_size}); train one with `python -m specvlm_core distill`")


def new_draft_for(target, seed: int = 0) -> EagleDraft:
    """A randomly initialised draft for a target (still lossless, only slower)."""
    torch.manual_seed(seed)
    draft = EagleDraft(DraftConfig.for_target(target))
    draft.requires_grad_(False)
    draft.eval()
    return draft.to(device=target.device, dtype=target.dtype)
