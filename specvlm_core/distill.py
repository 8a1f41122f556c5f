"""Online-logit distillation of an EagleVLM draft from a frozen target.

Every batch the target runs on the fly; its logits and final features are used at once
and never written anywhere (no feature corpus). For draft position p (input: embedding
of token p+1 and target feature f(p)) the draft predicts f(p+1):

    loss = lambda_logit * CE(softmax(teacher logits at p+1), draft logits)
         + lambda_feat  * SmoothL1(draft feature, f(p+1))

masked to positions whose next token is part of the answer. Uniform noise on the input
features (EAGLE) and a second, unrolled pass that feeds the draft its own predicted
features (what it sees deeper in a tree at inference) make it robust to its own errors.

The loop runs under `accelerate` (data-parallel with `accelerate launch`, one process
on a CPU), and as a background `DistillJob` (start / pause / resume / cancel) that the
CLI and the app share. Checkpoints are written atomically (temporary folder, then
rename) with the optimiser state; a killed run resumes from its last complete one.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from . import engine, world
from .draft import DraftConfig, EagleDraft
from .errors import InputError, MediaError, ParameterError, SpecVLMError
from .engine import visual_mask
from .models import Target, build_training_text, load_target, prepare_inputs, record_decoder_io

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"


@dataclass
class DistillConfig:
    model: str | None = None  # target name or folder (None: the embedded model)
    data: str = "generated"  # "generated" or a LLaVA-format JSON file
    media_dir: str | None = None
    steps: int | None = None  # total optimiser steps; or epochs x epoch size
    epochs: float | None = None
    epoch_size: int = 1024  # samples per epoch of the generated stream
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lambda_logit: float = 0.1
    lambda_feat: float = 1.0
    feature_noise: float = 0.2  # uniform noise amplitude, relative to the feature RMS
    unroll: int = 2  # passes per batch; passes > 1 feed the draft its own features
    self_distill: bool = False  # replace answers with the target's greedy answers
    compressor: dict | None = None  # compressor config (see specvlm_core.compressor)
    # How a "select" gate learns: "regret" (towards the best option measured on one
    # example per batch, see compressor.best_option) or "cost" (straight-through + cost).
    gate_supervision: str = "regret"
    out_dir: str = "runs/draft"
    checkpoint_every: int = 50
    eval_every: int = 50
    eval_samples: int = 6
    eval_max_new_tokens: int = 48
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False
    json_log: str | None = None
    resume: bool = False

    def total_steps(self, dataset_size: int | None) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = dataset_size if dataset_size is not None else self.epoch_size
        return max(1, math.ceil((self.epochs or 1.0) * per_epoch / self.batch_size))

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ParameterError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ParameterError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ParameterError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ParameterError(f"batch size must be >= 1, got {self.batch_size}")
        if self.gate_supervision not in ("regret", "cost"):
            raise ParameterError(f"gate supervision must be 'regret' or 'cost', got {self.gate_supervision!r}")
        if self.data != "generated" and not Path(self.data).is_file():
            raise InputError(f"data file not found: {self.data}")


# --------------------------------------------------------------------------- data

@dataclass
class Example:
    """One conversation turn to distil on: a prompt, an answer, and its media."""
    prompt: str
    answer: str
    image: object = None
    video: list | None = None


def generated_examples(seed: int, stride: int = 1, video: bool = True) -> Iterator[Example]:
    """The built-in world as an endless stream (seeds seed, seed+stride, ...); images
    only when video is False (for targets that take no video)."""
    s = seed
    while True:
        smp = world.make_sample(s, kind=None if video else "image")
        s += stride
        if smp.kind == "image":
            yield Example(smp.question, smp.answer, image=smp.frames[0])
        else:
            yield Example(smp.question, smp.answer, video=smp.frames)


def load_llava_records(path: str | Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {Path(path).name}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(records, list):
        raise InputError(f"{Path(path).name} must hold a JSON list of LLaVA-format records")
    return records


def llava_example(record: dict, media_dir: str | Path | None) -> Example:
    """A LLaVA-Instruct / ShareGPT4V record -> Example (its first human/gpt pair).
    Raises InputError/MediaError for a bad record."""
    from . import media

    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise InputError("record has no conversations list")
    turns = record["conversations"]
    human = next((t for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if human is None or gpt is None or not str(gpt.get("value", "")).strip():
        raise InputError("record lacks a human question and a gpt answer")
    prompt = str(human.get("value", "")).replace("<image>", "").replace("<video>", "").strip()
    if not prompt:
        raise InputError("empty question")
    base = Path(media_dir) if media_dir else Path(".")
    ex = Example(prompt, str(gpt["value"]).strip())
    if "image" in record:
        ex.image = media.load_image(_inside(base, record["image"]))
    elif "video" in record:
        ex.video = media.load_video(_inside(base, record["video"])).frames
    return ex


def _inside(base: Path, name: str) -> Path:
    """base/name, refusing names that escape base (no path traversal)."""
    path = (base / str(name)).resolve()
    if base.resolve() not in path.parents and path != base.resolve():
        raise MediaError(f"media path {name!r} points outside the media folder")
    return path


class ExampleSource:
    """Endless, skip-and-count iterator over the configured data."""

    def skip(self, reason: Exception) -> None:
        self.skipped += 1
        key = str(reason)[:80]
        self.skip_reasons[key] = self.skip_reasons.get(key, 0) + 1
        if self.records is not None and self.skipped > 10 * self.size + 100:
            raise InputError(f"too many bad records in {Path(self.config.data).name}: {key}")

    def __init__(self, config: DistillConfig, process_index: int = 0, num_processes: int = 1,
                 video: bool = True):
        self.config = config
        self.skipped = 0
        self.skip_reasons: dict[str, int] = {}
        if config.data == "generated":
            self.records = None
            self.size = None
            self._it = generated_examples(config.seed * 10**7 + process_index, stride=num_processes, video=video)
        else:
            self.records = load_llava_records(config.data)[process_index::num_processes]
            if not self.records:
                raise InputError(f"{Path(config.data).name} holds no records")
            self.size = len(self.records)
            self._order = list(range(self.size))
            self._pos = self.size
            self._rng = random.Random(config.seed)

    def __next__(self) -> Example:
        if self.records is None:
            return next(self._it)
        for _ in range(self.size + 1):
            if self._pos >= self.size:
                self._rng.shuffle(self._order)
                self._pos = 0
            record = self.records[self._order[self._pos]]
            self._pos += 1
            try:
                return llava_example(record, self.config.media_dir)
            except SpecVLMError as exc:
                self.skip(exc)
        raise InputError(f"no usable record in {Path(self.config.data).name} "
                         f"({self.skipped} skipped, e.g. {next(iter(self.skip_reasons), '?')})")


# ------------------------------------------------------------------ teacher side

@dataclass
class TeacherOutput:
    """Per example: embeds, features [S, H]; logits [S, V]; loss_mask [S-1]: position p
    predicts f(p+1) and is trained iff token p+2 belongs to the answer."""
    embeds: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    loss_mask: torch.Tensor
    visual_mask: torch.Tensor
    media: dict = field(default_factory=dict)


@torch.no_grad()
def teacher_forward(target: Target, ex: Example) -> TeacherOutput:
    kind = "image" if ex.image is not None else ("video" if ex.video is not None else None)
    full, prompt_text = build_training_text(target, ex.prompt, ex.answer, kind)
    kwargs = {}
    if ex.image is not None:
        kwargs["images"] = [ex.image]
    if ex.video is not None:
        kwargs["videos"] = [ex.video]
        kwargs["do_sample_frames"] = False
    batch = target.processor(text=[full], return_tensors="pt", **kwargs)
    batch = {k: (v.to(target.device).to(target.dtype) if v.is_floating_point() else v.to(target.device))
             if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    # Prompt length in the processed ids without running the processor twice: the
    # prompt's own tokens, with its visual placeholders expanded as in the full text.
    visual = visual_mask(target, batch)
    prompt_ids = target.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    placeholders = int(visual_mask(target, {"input_ids": torch.tensor([prompt_ids])}).sum())
    n_prompt = len(prompt_ids) - placeholders + int(visual.sum())
    with record_decoder_io(target.model) as rec:
        out = target.model(**batch, use_cache=False, return_dict=True)
    seq = batch["input_ids"].shape[1]
    # Answer tokens: from the end of the prompt through the first end-of-turn token
    # (templates may add a newline after it, which is never generated).
    ids = batch["input_ids"][0].tolist()
    eos = set(target.eos_token_ids())
    end = next((i for i in range(n_prompt, seq) if ids[i] in eos), seq - 1)
    is_answer = torch.zeros(seq, dtype=torch.bool)
    is_answer[n_prompt:end + 1] = True
    loss_mask = torch.zeros(seq - 1, dtype=torch.bool)
    # The first answer token comes from the target's prefill; the draft's first job is
    # the token after it (input: embedding of answer token 1, predicts token 2).
    loss_mask[: seq - 2] = is_answer[2:] & is_answer[1:-1]
    return TeacherOutput(embeds=rec["embeds"][0], features=rec["features"][0], logits=out.logits[0],
                         loss_mask=loss_mask, visual_mask=visual,
                         media={"image": ex.image, "video": ex.video, "grid": engine.visual_grid(target, batch)})


# --------------------------------------------------------------------- the loss

def distill_loss(draft, lm_head: torch.nn.Module, outs: list[TeacherOutput], config: DistillConfig,
                 generator: torch.Generator | None = None, compressor=None) -> dict:
    """Loss over a batch of teacher outputs. draft: the (possibly DDP-wrapped) draft,
    called for its forward; compressor: the draft's compressor or None.
    Returns a dict of tensors: loss, logit, feat, top1 (agreement of draft and teacher
    argmax on trained positions)."""
    device = next(draft.parameters()).device
    inputs_e, inputs_f, targets_f, targets_l, masks, cost_terms = [], [], [], [], [], []
    regret = (compressor is not None and compressor.mode == "select" and len(compressor.options) > 1
              and config.gate_supervision == "regret")
    gate_term = None
    for o in outs:
        embeds_in, feats_in, feats_out, logits_out, mask, info = draft_view(o, compressor)
        if "cost_loss" in info and not regret:
            cost_terms.append(info["cost_loss"])
        if regret and gate_term is None and info.get("visual_tokens_before"):
            gate_term = gate_regret_loss(draft, lm_head, o, compressor)
        inputs_e.append(embeds_in)
        inputs_f.append(feats_in)
        targets_f.append(feats_out)
        targets_l.append(logits_out)
        masks.append(mask)
    lengths = [e.shape[0] for e in inputs_e]
    s_max = max(lengths)

    def pad(seqs):
        return torch.stack([F.pad(x, (0, 0, 0, s_max - x.shape[0])) for x in seqs]).to(device)

    e, f, tf, tl = pad(inputs_e), pad(inputs_f), pad(targets_f).float(), pad(targets_l).float()
    attn = torch.stack([torch.arange(s_max) < n for n in lengths]).to(device)
    m = torch.stack([F.pad(x, (0, s_max - x.shape[0])) for x in masks]).to(device) & attn
    rms = f.float().pow(2).mean(-1, keepdim=True).sqrt()
    noise = (torch.rand(f.shape, generator=generator) - 0.5).to(device) * config.feature_noise * 2
    feats_in = f + (noise * rms).to(f.dtype)
    teacher_p = tl.softmax(-1)
    total, logit_terms, feat_terms, top1 = 0.0, [], [], None
    n = m.sum().clamp(min=1)
    for k in range(max(1, config.unroll)):
        pred = draft(e, feats_in, attention_mask=attn)
        logp = lm_head(pred).float().log_softmax(-1)
        ce = -(teacher_p * logp).sum(-1)
        l1 = F.smooth_l1_loss(pred.float(), tf, reduction="none").mean(-1)
        l_logit = (ce * m).sum() / n
        l_feat = (l1 * m).sum() / n
        total = total + (config.lambda_logit * l_logit + config.lambda_feat * l_feat) / config.unroll
        logit_terms.append(l_logit.detach())
        feat_terms.append(l_feat.detach())
        if top1 is None:
            top1 = ((logp.argmax(-1) == tl.argmax(-1)) & m).sum() / n
        # Next pass: position p sees the draft's own prediction of f(p) (made at p-1).
        feats_in = torch.cat([f[:, :1], pred[:, :-1].detach().to(f.dtype)], dim=1)
    if cost_terms:
        total = total + torch.stack(cost_terms).mean()
    out = {"loss": total, "logit": torch.stack(logit_terms).mean(), "feat": torch.stack(feat_terms).mean(),
           "top1": top1.detach()}
    if gate_term is not None:
        out["loss"] = total + gate_term["loss"]
        out["gate"] = gate_term["loss"].detach()
    return out


def draft_view(o: "TeacherOutput", compressor=None, force=None, training: bool = True):
    """What the draft trains on for one teacher output, after its compressor.

    Returns (embeds_in [S', H], feats_in [S', H], feats_out [S', H], logits_out [S', V],
    loss mask [S'], compressor info). Draft position p carries the embedding of token
    p+1, so the visual mask is shifted by one."""
    embeds_in, feats_in, feats_out, logits_out, mask = (o.embeds[1:], o.features[:-1], o.features[1:],
                                                        o.logits[1:], o.loss_mask)
    if compressor is None:
        return embeds_in, feats_in, feats_out, logits_out, mask, {}
    embeds_in, feats_in, info = compressor.compress_sequence(embeds_in, feats_in, o.visual_mask[1:], o.media,
                                                             training=training, force=force)
    # Positions the compressor made up (pooled, resampled) have no teacher target;
    # they are visual positions, which are never trained on anyway.
    src = info["source_index"].to(feats_out.device)
    real = src >= 0
    feats_out = torch.where(real[:, None], feats_out[src.clamp(min=0)], torch.zeros_like(feats_in))
    logits_out = logits_out[src.clamp(min=0)]
    mask = mask[src.clamp(min=0).cpu()] & real.cpu()
    return embeds_in, feats_in, feats_out, logits_out, mask, info


def gate_regret_loss(draft, lm_head: torch.nn.Module, o: "TeacherOutput", compressor) -> dict:
    """Train the select gate towards the best option for one example.

    Runs the draft (no gradient) under every option, measures its cross-entropy against
    the teacher on the answer tokens, and returns the gate's cross-entropy towards
    compressor.best_option (loss + lambda_cost x prefill ms). Returns {"loss", "target",
    "option_losses" [n_options]}."""
    device = next(draft.parameters()).device
    losses = []
    with torch.no_grad():
        for option in compressor.options:
            e, f, _, tl, m, info = draft_view(o, compressor, force=option)
            logp = lm_head(draft(e[None].to(device), f[None].to(device))).float().log_softmax(-1)[0]
            ce = -(tl.float().softmax(-1) * logp).sum(-1)
            m = m.to(ce.device)
            losses.append((ce * m).sum() / m.sum().clamp(min=1))
    losses = torch.stack(losses)
    # The visual run and its token grid, as compress_sequence saw them.
    n, grid = info["visual_tokens_before"], info["grid"]
    target = compressor.best_option(losses, n, grid)
    embeds_in, feats_in, visual = o.embeds[1:], o.features[:-1], o.visual_mask[1:].to(o.embeds.device)
    logits = compressor.gate_logits(embeds_in, feats_in, visual, n)
    loss = F.cross_entropy(logits[None], torch.tensor([target], device=logits.device))
    return {"loss": loss, "target": target, "option_losses": losses.cpu()}


# ------------------------------------------------------------------ evaluation

def held_out_examples(n: int, seed: int = world.EVAL_SEED + 5 * 10**6) -> list[Example]:
    """Held-out generated prompts (half images, half clips), disjoint from training."""
    out = []
    for i in range(n):
        smp = world.make_sample(seed + i, kind="video" if i % 2 else "image")
        out.append(Example(smp.question, smp.answer, image=smp.frames[0] if smp.kind == "image" else None,
                           video=smp.frames if smp.kind == "video" else None))
    return out


def evaluate_draft(target: Target, draft: EagleDraft, examples: list[Example], tree: engine.TreeSettings | None = None,
                   max_new_tokens: int = 48) -> dict:
    """tau (mean accepted per round, bonus included) of greedy speculative decoding."""
    tree = tree or engine.TreeSettings()
    was_training = draft.training
    draft.eval()
    tokens = rounds = 0
    try:
        for ex in examples:
            inputs = prepare_inputs(target, ex.prompt, image=ex.image, video=ex.video)
            drafter = engine.EagleDrafter(draft, target)
            res = engine.collect(engine.speculative_stream(
                target, drafter, inputs, engine.SamplingSettings(max_new_tokens=max_new_tokens), tree,
                media={"image": ex.image, "video": ex.video}))
            tokens += sum(len(e.new_tokens) for e in res.events if e.round > 0)
            rounds += res.rounds
    finally:
        draft.train(was_training)
    return {"tau": tokens / max(1, rounds), "rounds": rounds, "tokens": tokens}


@torch.no_grad()
def self_distilled(target: Target, ex: Example, max_new_tokens: int = 128) -> Example:
    """The example with its answer replaced by the target's own greedy answer."""
    inputs = prepare_inputs(target, ex.prompt, image=ex.image, video=ex.video)
    res = engine.collect(engine.autoregressive_stream(target, inputs,
                                                      engine.SamplingSettings(max_new_tokens=max_new_tokens)))
    answer = res.text.strip()
    return Example(ex.prompt, answer or ex.answer, ex.image, ex.video)


# ------------------------------------------------------------------ checkpoints

def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(out_dir: Path, step: int, draft: EagleDraft, optimizer, extra: dict, keep: int = 3) -> Path:
    """Write checkpoints/step-XXXXXXX atomically (complete or absent), prune old ones."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    draft.save_pretrained(tmp)
    _atomic_torch_save({"optimizer": optimizer.state_dict(), "step": step, **extra}, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a killed write are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file()
            and (p / "draft.safetensors").is_file()]
    return sorted(done, key=lambda p: p.name)


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- the loop

@torch.no_grad()
def measure_draft_ms_per_token(draft: EagleDraft, target: Target, n: int = 256, repeats: int = 5) -> float:
    """The draft's prefill cost per input token on this device (the compressor gate's
    cost unit), from the median of a few timed passes over n tokens."""
    h = draft.config.hidden_size
    x = torch.randn(1, n, h, device=target.device)
    times = []
    for _ in range(repeats + 1):
        engine.sync_device(target.device)
        t0 = time.perf_counter()
        draft(x, x)
        engine.sync_device(target.device)
        times.append((time.perf_counter() - t0) * 1000 / n)
    return round(sorted(times[1:])[repeats // 2], 5)


@dataclass
class Progress:
    state: str = "idle"  # idle | running | paused | finished | cancelled | failed
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    eta_s: float | None = None
    message: str = ""
    skipped_records: int = 0
    last_checkpoint: str | None = None


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(config: DistillConfig, target: Target | None = None, on_metrics: Callable[[dict], None] | None = None,
          control: "JobControl | None" = None, progress: Progress | None = None, show_bar: bool = True) -> Path:
    """Run distillation to completion (or cancellation). Returns the output folder,
    which holds the final draft (draft_config.json + draft.safetensors) for
    `generate --draft DIR`, and checkpoints/ for --resume."""
    from accelerate import Accelerator
    from tqdm import tqdm

    config.validate()
    control = control or JobControl()
    progress = progress or Progress()
    use_gpu = torch.cuda.is_available() and config.device != "cpu"
    accelerator = Accelerator(cpu=not use_gpu, mixed_precision="bf16" if use_gpu else "no")
    torch.manual_seed(config.seed + accelerator.process_index)
    if target is None:
        progress.message = "loading target"
        target = load_target(config.model, device=str(accelerator.device),
                             trust_remote_code=config.trust_remote_code)
    source = ExampleSource(config, accelerator.process_index, accelerator.num_processes,
                           video=target.supports_video)
    total = config.total_steps(source.size)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    draft_cfg = DraftConfig.for_target(target)
    draft = EagleDraft(draft_cfg)
    if config.compressor:
        from .compressor import build_compressor
        draft.compressor = build_compressor(config.compressor, draft_cfg.hidden_size)
    start_step = 0
    ckpts = list_checkpoints(out_dir) if config.resume else []
    resumed_state = None
    if ckpts:
        loaded = EagleDraft.from_pretrained(ckpts[-1], target=target)
        draft.load_state_dict(loaded.state_dict())
        draft.compressor = loaded.compressor
        resumed_state = load_trainer_state(ckpts[-1])
        start_step = int(resumed_state["step"])
    draft.to(device=target.device, dtype=torch.float32)
    if draft.compressor is not None and not ckpts:
        draft.compressor.ms_per_token = measure_draft_ms_per_token(draft, target)
    draft.requires_grad_(True)
    draft.train()
    decay = [p for p in draft.parameters() if p.dim() >= 2]
    no_decay = [p for p in draft.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    if resumed_state is not None:
        optimizer.load_state_dict(resumed_state["optimizer"])
    draft, optimizer = accelerator.prepare(draft, optimizer)
    raw_draft = accelerator.unwrap_model(draft)
    lm_head = target.model.get_output_embeddings()
    eval_set = held_out_examples(config.eval_samples) if config.eval_samples > 0 else []
    json_log = open(config.json_log, "a") if config.json_log and accelerator.is_main_process else None
    gen = torch.Generator().manual_seed(config.seed + 7919 * start_step)
    progress.state, progress.total_steps, progress.step = "running", total, start_step
    progress.message = f"resumed from step {start_step}" if start_step else "training"
    bar = tqdm(total=total, initial=start_step, desc="distill", unit="step",
               disable=not (show_bar and accelerator.is_main_process))
    t0, steps_done = time.time(), 0
    step = start_step
    try:
        while step < total:
            if not control.wait_if_paused(progress):
                break
            batch = []
            while len(batch) < config.batch_size:
                ex = next(source)
                try:
                    if config.self_distill:
                        ex = self_distilled(target, ex)
                    batch.append(teacher_forward(target, ex))
                except SpecVLMError as exc:  # e.g. a video record for an image-only target
                    source.skip(exc)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, config.lr, config.warmup_steps)
            with accelerator.autocast():
                losses = distill_loss(draft, lm_head, batch, config, gen, compressor=raw_draft.compressor)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            if raw_draft.compressor is not None and accelerator.num_processes > 1:
                # The compressor runs outside the DDP forward: average its gradients by hand.
                for p in raw_draft.compressor.parameters():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, "mean")
            if config.grad_clip:
                accelerator.clip_grad_norm_(draft.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            steps_done += 1
            elapsed = time.time() - t0
            per_epoch = source.size or config.epoch_size
            metrics = {"step": step, "epoch": round(step * config.batch_size / per_epoch, 4),
                       "loss": float(losses["loss"].detach()), "loss_logit": float(losses["logit"]),
                       "loss_feat": float(losses["feat"]), "top1": float(losses["top1"]),
                       **({"loss_gate": float(losses["gate"])} if "gate" in losses else {}),
                       "lr": optimizer.param_groups[0]["lr"], "seconds": round(elapsed, 2)}
            progress.step, progress.epoch = step, metrics["epoch"]
            progress.eta_s = elapsed / steps_done * (total - step)
            progress.skipped_records = source.skipped
            due = step == total or (config.eval_every > 0 and step % config.eval_every == 0)  # 0: at the end only
            if eval_set and due and accelerator.is_main_process:
                raw_draft.eval()
                metrics["tau"] = evaluate_draft(target, _as_inference(raw_draft, target), eval_set,
                                                max_new_tokens=config.eval_max_new_tokens)["tau"]
                raw_draft.train()
            if accelerator.is_main_process and (step == total or (config.checkpoint_every > 0
                                                                 and step % config.checkpoint_every == 0)):
                progress.last_checkpoint = str(save_checkpoint(
                    out_dir, step, raw_draft, optimizer, {"config": json.dumps(asdict(config))},
                    keep=config.keep_checkpoints))
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1=f"{metrics['top1']:.2f}",
                            **({"tau": f"{metrics['tau']:.2f}"} if "tau" in metrics else {}))
            bar.update(1)
            if json_log:
                json_log.write(json.dumps(metrics) + "\n")
                json_log.flush()
            if on_metrics:
                on_metrics(metrics)
        cancelled = control.cancelled
        if accelerator.is_main_process:
            raw_draft.save_pretrained(out_dir)
            if source.skipped:
                (out_dir / "skipped_records.json").write_text(json.dumps(source.skip_reasons, indent=2))
        progress.state = "cancelled" if cancelled else "finished"
        progress.message = (f"cancelled at step {step}" if cancelled else f"finished {step} steps") + \
            (f"; skipped {source.skipped} bad records" if source.skipped else "")
    except OSError as exc:
        progress.state, progress.message = "failed", f"cannot write to {out_dir}: {exc.strerror or exc}"
        raise SpecVLMError(progress.message) from exc
    finally:
        bar.close()
        if json_log:
            json_log.close()
    return out_dir


def _as_inference(draft: EagleDraft, target: Target) -> EagleDraft:
    """The training draft (fp32) cast for the engine, sharing nothing mutable."""
    if next(draft.parameters()).dtype == target.dtype:
        return draft
    clone = EagleDraft(draft.config)
    clone.compressor = draft.compressor
    clone.load_state_dict(draft.state_dict())
    return clone.to(device=target.device, dtype=target.dtype).eval()


# ------------------------------------------------------------- background job

class JobControl:
    """Pause / resume / cancel flags checked between steps."""

    def __init__(self):
        self._running = threading.Event()
        self._running.set()
        self.cancelled = False

    def pause(self):
        self._running.clear()

    def resume(self):
        self._running.set()

    def cancel(self):
        self.cancelled = True
        self._running.set()

    def wait_if_paused(self, progress: Progress) -> bool:
        """Block while paused; False once cancelled."""
        if not self._running.is_set():
            progress.state = "paused"
            self._running.wait()
            progress.state = "running"
        return not self.cancelled


class DistillJob:
    """A distillation run in a worker thread, with a small interface the CLI and the
    app share: start(), pause(), resume(), cancel(), wait(), status(), metrics,
    checkpoints(), draft_dir()."""

    def __init__(self, config: DistillConfig, target: Target | None = None):
        self.config = config
        self.target = target
        self.control = JobControl()
        self.progress = Progress()
        self.metrics: list[dict] = []
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "DistillJob":
        if self._thread is not None:
            raise SpecVLMError("this job was already started")
        self.config.validate()
        self._thread = threading.Thread(target=self._run, name="distill", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        try:
            train(self.config, self.target, on_metrics=self.metrics.append, control=self.control,
                  progress=self.progress, show_bar=False)
        except SpecVLMError as exc:
            self.error = str(exc)
            self.progress.state, self.progress.message = "failed", str(exc)
        except Exception as exc:  # a worker must never die silently
            log.exception("distillation failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.progress.state, self.progress.message = "failed", self.error

    def pause(self):
        self.control.pause()

    def resume(self):
        self.control.resume()

    def cancel(self):
        self.control.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        return asdict(self.progress)

    def checkpoints(self) -> list[str]:
        return [str(p) for p in list_checkpoints(self.config.out_dir)]

    def draft_dir(self) -> str | None:
        """The newest loadable draft: the final one, else the newest checkpoint."""
        out = Path(self.config.out_dir)
        if (out / "draft.safetensors").is_file() and not self.running:
            return str(out)
        ckpts = list_checkpoints(out)
        return str(ckpts[-1]) if ckpts else None


# ------------------------------------------------------------- scaling report

def scaling_curve(json_log: str | Path, steps_per_epoch: int) -> list[dict]:
    """tau measured at each epoch boundary of a run's --json-log (eval_every must be
    the epoch length): [{"epoch", "step", "tau", "top1", "loss"}]."""
    rows = [json.loads(line) for line in Path(json_log).read_text().splitlines() if line.strip()]
    curve = []
    for r in rows:
        if "tau" in r and r["step"] % steps_per_epoch == 0:
            curve.append({"epoch": r["step"] // steps_per_epoch, "step": r["step"], "tau": round(r["tau"], 4),
                          "top1": round(r["top1"], 4), "loss": round(r["loss"], 4)})
    return curve


def write_scaling_report(curve: list[dict], out_dir: str | Path, title: str = "Training-time scaling") -> None:
    """scaling.json and scaling.html (plotly) in out_dir."""
    import plotly.graph_objects as go
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(curve, indent=2))
    fig = go.Figure(go.Scatter(x=[c["epoch"] for c in curve], y=[c["tau"] for c in curve], mode="lines+markers",
                               name="tau"))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="tau (mean accepted per round)")
    (out / "scaling.html").write_text(fig.to_html(include_plotlyjs="cdn"))
