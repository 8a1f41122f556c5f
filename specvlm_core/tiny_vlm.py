"""The embedded target model: a tiny Qwen2-VL trained on the generated world.

Why Qwen2-VL: its vision tower turns every 2x2 group of patches into one visual token,
so the token count grows with resolution (and with clip length, one token group per
two frames) exactly as in the real family, while a 4-layer 128-wide ViT costs little on
a CPU. Stock transformers loads it offline with AutoModelForImageTextToText and
AutoProcessor; nothing here is needed at inference time.

Sizes (see TINY_CONFIG): ViT 4x128 on 8 px patches (one visual token = 16x16 px),
text decoder 8 layers x 256 wide, 4 heads / 2 KV heads, byte-level BPE of 1024 tokens.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from . import world

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen-style chat template: media first, then the text, as the generator's chats are.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_CONFIG = dict(
    vocab_size=1024,
    vision=dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2, patch_size=8,
                spatial_merge_size=2, temporal_patch_size=2),
    text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rope_theta=10000.0, mrope_section=[8, 12, 12]),
    # Min/max pixels in training: 25..196 visual tokens per image (the saved processor
    # raises the floor to INFERENCE_IMAGE_MIN_PIXELS).
    image_pixels=(80 * 80, 224 * 224),
    # Per frame; 16..36 tokens per 2 frames. 128x128 frames (64 tokens) halved the clip
    # batches' steps per minute and motion fell from 33% to 17% in the same budget.
    video_pixels=(64 * 64, 96 * 96),
)


def build_tokenizer(vocab_size: int = 1024, n_texts: int = 6000):
    """Byte-level BPE fitted on the generator's text: every world word is one or two
    tokens, and any other text (emoji included) still encodes byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(world.corpus_text(n_texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, model_max_length=4096,
        additional_special_tokens=SPECIAL_TOKENS[1:])


def build_processor(tokenizer, cfg: dict = TINY_CONFIG):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    v = cfg["vision"]
    common = dict(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                  temporal_patch_size=v["temporal_patch_size"])
    image_processor = Qwen2VLImageProcessor(min_pixels=cfg["image_pixels"][0],
                                            max_pixels=cfg["image_pixels"][1], **common)
    video_processor = Qwen2VLVideoProcessor(min_pixels=cfg["video_pixels"][0],
                                            max_pixels=cfg["video_pixels"][1],
                                            min_frames=2, max_frames=32,
                                            cap_pixels_per_frame=False, **common)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def qwen_text_config(tokenizer, t: dict, **token_ids) -> dict:
    """The text-decoder part of a Qwen2-VL / Qwen2.5-VL config from a size dict."""
    return dict(
        vocab_size=len(tokenizer), hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
        max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"],
                         "mrope_section": t["mrope_section"]},
        tie_word_embeddings=True, **token_ids)


def build_config(tokenizer, cfg: dict = TINY_CONFIG):
    from transformers import Qwen2VLConfig
    t, v = cfg["text"], cfg["vision"]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text_config = qwen_text_config(tokenizer, t, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                   pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=t["hidden_size"],
                         num_heads=v["num_heads"], mlp_ratio=v["mlp_ratio"], patch_size=v["patch_size"],
                         spatial_merge_size=v["spatial_merge_size"],
                         temporal_patch_size=v["temporal_patch_size"])
    return Qwen2VLConfig(text_config=text_config, vision_config=vision_config,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=ids["<|endoftext|>"])


def chat_messages(sample_kind: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": sample_kind}, {"type": "text", "text": question}]}]


def encode_batch(processor, samples, with_answers: bool = True):
    """Processor outputs for a batch of world samples, with labels masked to answers.

    Returns a dict of tensors: input_ids/attention_mask [B, S], labels [B, S] (-100
    outside the answers), pixel_values / image_grid_thw or pixel_values_videos /
    video_grid_thw. Sequences are right-padded.
    """
    tok = processor.tokenizer
    prompts, images, videos = [], [], []
    for s in samples:
        prompt = processor.apply_chat_template(chat_messages(s.kind, s.question),
                                               add_generation_prompt=True, tokenize=False)
        if with_answers:
            prompt = prompt + s.answer + "<|im_end|>"
        prompts.append(prompt)
        if s.kind == "image":
            images.append(s.frames[0])
        else:
            videos.append(s.frames)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
        kwargs["do_sample_frames"] = False
    tok.padding_side = "right" if with_answers else "left"
    batch = processor(text=prompts, padding=True, return_tensors="pt", **kwargs)
    if with_answers:
        labels = batch["input_ids"].clone()
        start_ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        for b in range(labels.shape[0]):
            ids = batch["input_ids"][b].tolist()
            # The answer starts after the last "<|im_start|>assistant\n".
            n = len(start_ids)
            pos = max(i for i in range(len(ids) - n + 1) if ids[i:i + n] == start_ids) + n
            labels[b, :pos] = -100
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


# ------------------------------------------------------------------------- training

# Dense auxiliary targets for the visual tokens: what object (colour, shape, size) each
# token shows (0 = background) and which 3x3 grid cell it lies in. The head exists only
# during training and is not saved.
AUX_CLASSES = (len(world.COLOURS) + 1, len(world.SHAPES) + 1, len(world.SIZES) + 1, len(world.CELLS))


def visual_token_targets(samples, grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """Per merged visual token: the (colour, shape, size) class of the object it covers,
    and its grid cell.

    Why: trained only through the language loss, a from-scratch VLM this small learns
    the text statistics long before it learns to look (the first model plateaued at a
    text-only loss). Telling every visual token what it shows, and where it is (the
    ViT's rotary positions are relative only), makes the vision tower's output readable
    from the start, so the decoder only has to learn where to look.

    samples: the batch's samples of one kind; grid_thw [n_media, 3] in patches.
    Returns long [n_tokens, 4] in the merger's output order (media, time, row, column).
    A clip's temporal group k shows frame 2k (events happen on even frames).
    """
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    rows = []
    for sample, (t, gh, gw) in zip(samples, grid_thw.tolist()):
        gh, gw = gh // merge, gw // merge
        for k in range(t):
            objects = sample.frame_objects(min(2 * k, len(sample.frames) - 1))
            # A token shows an object if its centre lies inside the object's box, or if it
            # holds the object's centre (so the smallest objects get a token too). Tokens
            # that only graze an object stay background: a wider margin made their labels
            # a guess and slowed shape learning about threefold.
            centre_token = {}
            for o in objects:
                cx, cy = world.cell_centre(o.cell)
                centre_token[(min(gh - 1, int(cy * gh)), min(gw - 1, int(cx * gw)))] = o
            for i in range(gh):
                for j in range(gw):
                    x, y = (j + 0.5) / gw, (i + 0.5) / gh
                    o = world.object_at(objects, x, y, gw / gh) or centre_token.get((i, j))
                    what = (colours.index(o.colour) + 1, shapes.index(o.shape) + 1,
                            world.SIZES.index(o.size) + 1) if o else (0, 0, 0)
                    rows.append(what + (world.cell_of(x, y),))
    return torch.tensor(rows, dtype=torch.long)


def aux_visual_loss(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the four per-token classifications, plus the colour, shape
    and size cross-entropy over the object tokens alone. features [n, H], targets [n, 4].

    Why the extra terms: most visual tokens are background, so in the plain mean the
    hard part (which shape an object is: a token's colour shows in its own patch, its
    shape only across neighbouring patches) gets a small share of the gradient; the
    first model with the plain mean read colours and cells but not shapes."""
    ce = torch.nn.functional.cross_entropy
    logits = head(features).split(AUX_CLASSES, dim=-1)
    loss = sum(ce(lg, targets[:, i]) for i, lg in enumerate(logits)) / len(logits)
    on_object = targets[:, 1] > 0
    if on_object.any():
        loss = loss + sum(w * ce(logits[i][on_object], targets[on_object, i]) for i, w in ((0, 1.0), (1, 1.0), (2, 0.5)))
    return loss


@torch.no_grad()
def object_shape_accuracy(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Fraction of object tokens whose shape the auxiliary head gets right (a training
    diagnostic: the decoder cannot name a shape the vision tower does not encode)."""
    on_object = targets[:, 1] > 0
    if not on_object.any():
        return None
    shape_logits = head(features[on_object]).split(AUX_CLASSES, dim=-1)[1]
    return (shape_logits.argmax(-1) == targets[on_object, 1]).float().mean().item()


# Scenes of the vision phase are crowded: object tokens carry the shape signal and most
# tokens of a 1-6 object scene are background. A 5-minute A/B of the phase alone
# (docs/experiments/vision_ab.py): held-out shape accuracy 40% with 5-9 objects vs 35% with 1-6.
VISION_OBJECTS = (5, 9)

CHANGE_LAYER = 4  # decoder layer whose video-token states learn to flag changes


def change_targets(targets: torch.Tensor, grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """Per video token: 1 if what it shows (colour, shape, size) differs from the same
    token of its clip's first temporal group, else 0.

    targets [n_tokens, 4] from visual_token_targets; grid_thw [n_clips, 3] in patches.
    Returns long [n_tokens]. Why: the vision tower sees one temporal group at a time
    (its attention never crosses groups), so noticing that something moved, appeared,
    vanished or changed colour is the decoder's job; this target teaches a middle
    decoder layer to compare each token with the first frame, which the motion answers
    then only have to read out."""
    flags, start = [], 0
    for t, gh, gw in grid_thw.tolist():
        n = (gh // merge) * (gw // merge)
        what = targets[start:start + t * n, :3].view(t, n, 3)
        flags.append((what != what[:1]).any(-1).flatten().long())
        start += t * n
    return torch.cat(flags)


# At inference, stills are upscaled to at least this many pixels before the vision tower
# (training keeps TINY_CONFIG's 80x80 floor, so its steps stay cheap). More patches per
# object help the small objects of small images, the model's weakest case. Measured on
# the checkpoint trained with the 80x80 floor (greedy): on 200 validation scenes and
# count questions (seeds EVAL_SEED + 5*10**6, used to pick) a floor of 80 / 112 / 128 /
# 144 px gave descriptions 75.5 / 77.0 / 77.0 / 77.5% and counts 83.5 / 84.0 / 84.5 /
# 84.5%; 128 px, the middle of the plateau, lifts the held-out sets from 81.0 to 85.5%
# and from 82.5 to 83.5%. Images above the floor get the same tokens as before. Clip
# frames keep TINY_CONFIG's bounds: on 100 validation clips, frame floors of 64 / 80 /
# 96 px gave motion 38 / 38 / 37%, and a 112 px ceiling 33-34%.
INFERENCE_IMAGE_MIN_PIXELS = 128 * 128


def set_image_min_pixels(processor, min_pixels: int) -> None:
    """Make processor's image processor upscale stills to at least min_pixels (in place);
    the largest size stays as it is."""
    size = processor.image_processor.size
    processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": size["longest_edge"]}


def media_inputs(processor, samples, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thw) of a batch of samples of one kind, for the vision tower alone."""
    if kind == "image":
        out = processor.image_processor(images=[s.frames[0] for s in samples], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]
    out = processor.video_processor(videos=[s.frames for s in samples], do_sample_frames=False,
                                    return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"]


def lr_at(step: int, progress: float, peak: float, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 10% of peak as the time
    budget runs out (progress = elapsed / budget), so the schedule completes even
    when the machine is busy and steps are slower than expected."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# One size bucket per batch keeps padding low; small images are the cheapest steps, so
# they are sampled most, but every resolution is seen.
SIZE_BUCKETS = ((64, 128), (64, 128), (128, 224), (224, 384))
# The tasks of training stills and their weights (world.make_sample's task names; "qa"
# is the generator's own question mix). Counting one colour gets three times the
# generator's share: it is the hardest question, and a colour absent from the scene
# (answer zero) is rare in the generator's mix. The held-out sets are unchanged.
TRAIN_IMAGE_TASKS = {"describe": 0.45, "count_colour": 0.2, "qa": 0.35}


def adamw(named, lr: float) -> torch.optim.AdamW:
    """AdamW over (name, parameter) pairs: weight decay on matrices only."""
    return torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.05},
                              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def train_tiny_vlm(out_dir: str, minutes: float = 88.0, max_steps: int = 100000,
                   batch_size: int = 16, lr: float = 1.5e-3, seed: int = 0,
                   threads: int | None = None, log_every: int = 20, progress: bool = True,
                   eval_scenes: int = 200, eval_clips: int = 100, aux_weight: float = 0.5,
                   probe_every_minutes: float = 0.0, probe_scenes: int = 16,
                   vision_minutes: float = 15.0, vision_batch_size: int = 32, vision_lr: float = 2e-3,
                   video_share: float = 0.4) -> dict:
    """Train the embedded model from scratch on the generated world for a time budget.

    Writes config, processor, tokenizer and safetensors weights to out_dir, then the
    held-out quality metrics to out_dir/metrics.json. Returns the metrics dict.
    The loss is the answers' cross-entropy plus aux_weight x the visual tokens' dense
    object classification (see visual_token_targets) plus, on clips, aux_weight x a
    decoder-side change loss (see change_targets). probe_every_minutes > 0 logs a
    small held-out quality probe (probe_scenes scenes) that often; its time counts
    against the budget.

    vision_minutes > 0 first trains the vision tower alone on the dense visual loss, on
    stills, for that long (part of the budget): without the decoder a step costs a
    fraction of a joint step, so the tower sees several times more images per minute,
    and it is the part that has to learn shapes. video_share is the fraction of batches that are clips.
    """
    from tqdm import tqdm
    from transformers import Qwen2VLForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    model = Qwen2VLForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    hidden = config.text_config.hidden_size
    aux_head = torch.nn.Linear(hidden, sum(AUX_CLASSES))
    change_head = torch.nn.Linear(hidden, 2)
    merged = []  # the vision merger's outputs of the current forward
    model.model.visual.merger.register_forward_hook(lambda _m, _a, output: merged.append(output))
    params = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux_head.named_parameters()] + \
        [("change." + n, p) for n, p in change_head.named_parameters()]

    def update(optimizer, loss: torch.Tensor, named, lr_now: float) -> None:
        """One optimiser step on loss at learning rate lr_now, gradients clipped to norm 1."""
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()

    video_id = config.video_token_id
    # Changes are rare among a clip's tokens; weigh them up so the flag is not just "no".
    change_class_weight = torch.tensor([1.0, 4.0])
    t0 = time.time()
    budget = minutes * 60
    log = []

    def record(entry: dict) -> None:
        """Keep a log entry and append it to train_log.jsonl as it happens."""
        log.append(entry)
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
    model.train()
    # The budget is time, so the bar counts seconds; the postfix shows step and loss.
    bar = tqdm(total=int(budget), disable=not progress, desc="tiny-train", unit="s")
    seed_cursor = seed * 10**7

    def next_batch(size: int, clip_share: float, object_range: tuple[int, int] | None = None):
        """A batch of one kind and one size bucket (see SIZE_BUCKETS); object_range as
        in world.make_sample."""
        nonlocal seed_cursor
        kind = "video" if random.random() < clip_share else "image"
        lo, hi = random.choice(SIZE_BUCKETS)
        tasks = random.choices(list(TRAIN_IMAGE_TASKS), list(TRAIN_IMAGE_TASKS.values()), k=size) \
            if kind == "image" else [None] * size
        samples = [world.make_sample(seed_cursor + i, kind=kind, task=task, size_range=(lo, hi),
                                     object_range=object_range) for i, task in enumerate(tasks)]
        seed_cursor += size
        return kind, samples

    vision_budget = min(vision_minutes * 60, budget)
    if vision_budget > 0:
        vision_params = [("visual." + n, p) for n, p in model.model.visual.named_parameters()] + \
            [("aux." + n, p) for n, p in aux_head.named_parameters()]
        vopt = adamw(vision_params, lr)
        vstep = 0
        while time.time() - t0 < vision_budget:
            # Stills only: a clip's frames come from the same renderer at lower resolution,
            # and still batches teach shapes at several times the images per second.
            kind, samples = next_batch(vision_batch_size, 0.0, VISION_OBJECTS)
            pixels, grid = media_inputs(processor, samples, kind)
            lr_now = lr_at(vstep, (time.time() - t0) / vision_budget, vision_lr)
            features = model.model.visual(pixels, grid_thw=grid).pooler_output
            targets = visual_token_targets(samples, grid)
            aux = aux_visual_loss(aux_head, features, targets)
            update(vopt, aux, vision_params, lr_now)
            vstep += 1
            elapsed = time.time() - t0
            if vstep % log_every == 0:
                record({"phase": "vision", "kind": kind, "step": vstep, "aux_loss": round(aux.item(), 4),
                        "shape_accuracy": object_shape_accuracy(aux_head, features.detach(), targets),
                        "seconds": round(elapsed, 1)})
            bar.set_postfix(phase="vision", step=vstep, aux=f"{aux.item():.3f}")
            bar.update(min(int(budget), int(elapsed)) - bar.n)
        del vopt

    opt = adamw(params, lr)
    joint_start, joint_budget = time.time(), budget - (time.time() - t0)
    step = 0
    next_probe = (time.time() - t0) + probe_every_minutes * 60
    while step < max_steps:
        kind, samples = next_batch(batch_size, video_share)
        batch = encode_batch(processor, samples)
        lr_now = lr_at(step, max((time.time() - joint_start) / max(joint_budget, 1e-9), step / max_steps), lr)
        merged.clear()
        outputs = model(**batch, output_hidden_states=kind == "video")
        lm_loss = outputs.loss
        grid = batch["image_grid_thw" if kind == "image" else "video_grid_thw"]
        targets = visual_token_targets(samples, grid)
        aux = aux_visual_loss(aux_head, merged[0], targets)
        if kind == "video":
            states = outputs.hidden_states[CHANGE_LAYER][batch["input_ids"] == video_id]
            aux = aux + torch.nn.functional.cross_entropy(change_head(states), change_targets(targets, grid),
                                                          weight=change_class_weight)
        update(opt, lm_loss + aux_weight * aux, params, lr_now)
        step += 1
        elapsed = time.time() - t0
        if step % log_every == 0:
            record({"step": step, "kind": kind, "loss": round(lm_loss.item(), 4), "aux_loss": round(aux.item(), 4),
                    "shape_accuracy": object_shape_accuracy(aux_head, merged[0].detach(), targets),
                    "seconds": round(elapsed, 1)})
        bar.set_postfix(step=step, loss=f"{lm_loss.item():.3f}", aux=f"{aux.item():.3f}")
        bar.update(min(int(budget), int(elapsed)) - bar.n)
        if probe_every_minutes and elapsed >= next_probe:
            # A small held-out probe, so a long run shows early whether the model looks.
            model.eval()
            probe = evaluate_quality(model, processor, probe_scenes, probe_scenes // 2)
            model.train()
            record({"step": step, "seconds": round(time.time() - t0, 1),
                    "probe": {k: probe[k] for k in ("describe_all_objects", "count_accuracy", "motion_accuracy")}})
            next_probe += probe_every_minutes * 60
        if elapsed > budget or step >= max_steps:
            break
    bar.close()
    train_seconds = time.time() - t0
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    # The probes above ran at the training floor; the saved processor and the final
    # metrics below use the inference floor, as every later user of the model does.
    set_image_min_pixels(processor, INFERENCE_IMAGE_MIN_PIXELS)
    processor.save_pretrained(out)
    metrics = evaluate_quality(model, processor, eval_scenes, eval_clips, progress=progress)
    metrics.update({"train_steps": step, "train_seconds": round(train_seconds, 1),
                    "batch_size": batch_size, "lr": lr, "seed": seed, "parameters": n_params,
                    "final_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "train_config.json").write_text(json.dumps({"tiny_config": TINY_CONFIG, "minutes": minutes,
                                                        "max_steps": max_steps, "batch_size": batch_size,
                                                        "lr": lr, "seed": seed, "aux_weight": aux_weight,
                                                        "vision_minutes": vision_minutes,
                                                        "vision_batch_size": vision_batch_size,
                                                        "vision_lr": vision_lr,
                                                        "vision_objects": list(VISION_OBJECTS),
                                                        "image_tasks": TRAIN_IMAGE_TASKS,
                                                        "video_share": video_share},
                                                       indent=2))
    return metrics


# ----------------------------------------------------------------------- evaluation

VERBS = {"move": " moves ", "appear": " appears ", "disappear": " disappears ", "recolour": " turns "}


def _mentions_all_objects(text: str, objects) -> bool:
    text = text.lower()
    return all(o.name in text for o in objects)


@torch.no_grad()
def greedy_answers(model, processor, samples, max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        for kind in ("image", "video"):
            sub = [s for s in chunk if s.kind == kind]
            if not sub:
                continue
            batch = encode_batch(processor, sub, with_answers=False)
            gen = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
            texts = processor.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for s, t in zip(sub, texts):
                s.extra["prediction"] = t.strip()
        out.extend(s.extra["prediction"] for s in chunk)
    return out


def evaluate_quality(model, processor, n_scenes: int = 200, n_clips: int = 100,
                     seed: int = world.EVAL_SEED, progress: bool = False) -> dict:
    """Held-out quality with greedy decoding (the metrics of the model card).

    - describe_all_objects: fraction of scene descriptions naming every object's
      colour+shape;
    - count_accuracy: fraction of count answers whose final number is right;
      count_accuracy_all_objects / _one_colour: the same over questions that count
      every object / only the objects of one colour;
    - motion_accuracy: fraction of clips whose answer states every event exactly;
    - object_{name,colour,shape,where}_recall: over all objects of all scenes, the
      fraction whose colour+shape / colour / shape / cell the description mentions;
    - motion_kind_accuracy: fraction of clips whose answer names the first event's kind.
    """
    model.eval()
    scenes = [world.make_sample(seed + i, kind="image", task="describe") for i in range(n_scenes)]
    counts = [world.make_sample(seed + 10**6 + i, kind="image", task="count") for i in range(n_scenes)]
    clips = [world.make_sample(seed + 2 * 10**6 + i, kind="video", task="motion") for i in range(n_clips)]
    descs = greedy_answers(model, processor, scenes)
    count_ans = greedy_answers(model, processor, counts)
    motion_ans = greedy_answers(model, processor, clips)
    desc_ok = sum(_mentions_all_objects(t, s.objects) for t, s in zip(descs, scenes))
    # Per object, which parts of it the description gets right (where the misses are).
    objects = [(o, t.lower()) for t, s in zip(descs, scenes) for o in s.objects]
    parts = {"name": lambda o: o.name, "colour": lambda o: f"{o.colour} ", "shape": lambda o: f" {o.shape}",
             "where": lambda o: o.where}
    recall = {f"object_{k}_recall": sum(f(o) in t for o, t in objects) / max(1, len(objects))
              for k, f in parts.items()}
    count_right = [world.stated_count(t) == world.stated_count(s.answer) for t, s in zip(count_ans, counts)]
    count_ok = sum(count_right)
    # Counting all objects vs one colour ("How many green objects?"): the second also needs the question read.
    one_colour = [world.counted_colour(s.question) is not None for s in counts]
    count_split = {f"count_accuracy_{name}": sum(r for r, c in zip(count_right, one_colour) if c == want)
                   / max(1, sum(c == want for c in one_colour))
                   for name, want in (("all_objects", False), ("one_colour", True))}
    motion_ok = sum(all(e.sentence() in t.lower() for e in s.events) for t, s in zip(motion_ans, clips))
    return {"describe_all_objects": desc_ok / max(1, n_scenes),
            "count_accuracy": count_ok / max(1, n_scenes), **count_split,
            "motion_accuracy": motion_ok / max(1, n_clips), **recall,
            "motion_kind_accuracy": sum(VERBS[s.events[0].kind] in t.lower() for t, s in zip(motion_ans, clips))
            / max(1, n_clips),
            "n_scenes": n_scenes, "n_clips": n_clips,
            "examples": [{"question": s.question, "answer": s.answer, "prediction": t}
                         for s, t in list(zip(scenes, descs))[:3] + list(zip(clips, motion_ans))[:2]]}


def write_model_card(model_dir: str | Path) -> Path:
    """assets/tiny-vlm/README.md from the folder's config, metrics and training log."""
    folder = Path(model_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    train_cfg = json.loads((folder / "train_config.json").read_text())
    cfg = train_cfg["tiny_config"]
    t, v = cfg["text"], cfg["vision"]
    image_tasks = ", ".join(f"{name} {weight:.0%}" for name, weight in
                            train_cfg.get("image_tasks", {"describe": 0.5, "qa": 0.5}).items())
    size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    image_floor = json.loads((folder / "processor_config.json").read_text())["image_processor"]["size"]["shortest_edge"]
    floor_note = ("" if image_floor == cfg["image_pixels"][0] else
                  f" in training; at inference stills are upscaled to at least {image_floor} pixels, "
                  f"{image_floor // 256}..{cfg['image_pixels'][1] // 256} tokens, which helps the small objects of "
                  "small images: `tiny_vlm.INFERENCE_IMAGE_MIN_PIXELS`")
    probes = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()
              if '"probe"' in line] if (folder / "train_log.jsonl").is_file() else []
    probe_table = ""
    if probes:
        probe_table = ("Held-out probes during training (16 scenes, 8 clips each; `train_log.jsonl`):\n\n"
                       "| minutes | step | describe | count | motion |\n|---|---|---|---|---|\n" +
                       "\n".join(f"| {p['seconds'] / 60:.0f} | {p['step']} | {p['probe']['describe_all_objects']:.0%} | "
                                 f"{p['probe']['count_accuracy']:.0%} | {p['probe']['motion_accuracy']:.0%} |"
                                 for p in probes))
    missed = [name for name, key, goal in (("descriptions", "describe_all_objects", 0.9),
                                           ("counts", "count_accuracy", 0.85), ("motion", "motion_accuracy", 0.8))
              if metrics[key] < goal]
    status = ("**Status: every quality target is met.**" if not missed else
              f"**Status: quality targets NOT met for {', '.join(missed)}.** See the diagnostics below.")
    diagnostics = ""
    if "object_name_recall" in metrics:
        diagnostics = ("\nWhere the misses are (over every object of the 200 described scenes: the share whose "
                       f"colour+shape / colour / shape / grid cell the description mentions): "
                       f"{metrics['object_name_recall']:.0%} / {metrics['object_colour_recall']:.0%} / "
                       f"{metrics['object_shape_recall']:.0%} / {metrics['object_where_recall']:.0%}; clips whose "
                       f"answer names the right kind of event: {metrics['motion_kind_accuracy']:.0%}.\n")
        if "count_accuracy_one_colour" in metrics:
            diagnostics += (f"Count questions about every object are right {metrics['count_accuracy_all_objects']:.0%} "
                            "of the time, about one colour (\"How many green objects?\") "
                            f"{metrics['count_accuracy_one_colour']:.0%}.\n")
    vision_phase = (f"; the first {train_cfg['vision_minutes']:g} minutes train the vision tower alone on the "
                    f"dense visual loss, {train_cfg['vision_batch_size']} stills per step"
                    + (" of {}-{} objects".format(*train_cfg["vision_objects"]) if "vision_objects" in train_cfg else "")
                    if train_cfg.get("vision_minutes") else "")
    # Every setting that shapes the run, so the command reproduces it whatever the CLI defaults are.
    command_flags = "".join(f" --{flag} {train_cfg[key]:g}" for flag, key in
                            (("vision-minutes", "vision_minutes"), ("lr", "lr"), ("video-share", "video_share"),
                             ("batch-size", "batch_size"), ("seed", "seed")) if key in train_cfg)
    examples = "\n".join(f"- Q: {e['question']}\n  - truth: {e['answer']}\n  - model: {e['prediction']}"
                         for e in metrics.get("examples", []))
    card = f"""# tiny-vlm: the embedded target model of SpecVLM Studio

A {metrics['parameters'] / 1e6:.1f} M-parameter **Qwen2-VL** (`Qwen2VLForConditionalGeneration`)
trained from scratch on the project's procedural "world of shapes". Stock transformers
loads it offline:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("assets/tiny-vlm")
processor = AutoProcessor.from_pretrained("assets/tiny-vlm")
```

## Architecture
- Vision: Qwen2-VL ViT, {v['depth']} layers x {v['embed_dim']} wide, {v['num_heads']} heads, {v['patch_size']} px
  patches, 2x2 patch merging: **one visual token per 16x16 px**, so the token count grows
  with resolution ({cfg['image_pixels'][0]}..{cfg['image_pixels'][1]} pixels per image, i.e. {cfg['image_pixels'][0] // 256}..{cfg['image_pixels'][1] // 256}
  tokens{floor_note}) and with clip length (one token grid per 2 frames; frames of
  {cfg['video_pixels'][0]}..{cfg['video_pixels'][1]} pixels).
- Text decoder: {t['num_hidden_layers']} layers x {t['hidden_size']} wide, {t['num_attention_heads']} heads /
  {t['num_key_value_heads']} KV heads, SwiGLU {t['intermediate_size']}, M-RoPE sections {t['mrope_section']},
  tied embeddings.
- Tokenizer: byte-level BPE fitted on the generator's text (vocabulary
  {cfg['vocab_size']} requested; every world word is one or two tokens, any other text
  still encodes byte by byte). Qwen-style chat template with
  `<|vision_start|><|image_pad|><|vision_end|>` / `<|video_pad|>` placeholders.
- Why Qwen2-VL: visual token counts scale with resolution and frames like the real
  family, the ViT is cheap on a CPU at this width, and its M-RoPE exercises the
  engine's 3-row position ids.
- Weights: {size_mb:.1f} MB safetensors (float32).

## Training
- Command: `python -m specvlm_core tiny-train --out assets/tiny-vlm --minutes {train_cfg['minutes']:g}{command_flags}`
  (AdamW, warm-up then cosine to 10% over the time budget, one size bucket per
  batch{vision_phase}).
- Loss: the answers' cross-entropy plus {train_cfg.get('aux_weight', 0)} x a dense auxiliary loss on the vision
  tower's output: every visual token is classified by the colour, shape and size of the
  object it covers (or background) and by its 3x3 grid cell, with targets computed from
  the generator's own geometry (`tiny_vlm.visual_token_targets`); the object tokens'
  colour, shape and size count again on their own, so the few tokens that show an object
  are not outweighed by the many background ones. The auxiliary heads are single linear
  layers used only in training and not saved, so the checkpoint is a stock Qwen2-VL. Why:
  trained through the language loss alone, the first version of this model learned the
  world's grammar but never looked (its loss stalled at a text-only model's ~0.6
  nats/token for 2,000 steps); with the dense targets the vision tower's output says what
  is where, and the decoder only has to learn to read it.
- On clips, the same weight x a change loss on decoder layer {CHANGE_LAYER}'s video-token states:
  does this token show something different from the clip's first frame
  (`tiny_vlm.change_targets`)? The vision tower sees one temporal group at a time, so
  noticing an event is the decoder's job; this teaches it where to look.
- Counting answers list what they count, in reading order, then give the number ("I see a
  small red circle in the top left and a large blue star in the center, so there are two
  objects."): a small model counts a list it has written far more reliably than a set of
  image patches. A question about one colour gets the same listing, then the objects of
  that colour ("... Of these, the green ones are the star and the circle, so there are
  two green objects."; "none is green" for zero), so picking them out is a lookup in
  its own text. Motion answers likewise name the first frame's objects before the
  events ("At the start there are ... Then the red cross moves from ... to ...").
- Data: `specvlm_core/world.py`, an endless deterministic stream: scenes of 1-6
  objects (8 shapes, 8 colours, 2 sizes, 3x3 grid, optional letters) at 64-384 px in 7
  aspect ratios, and 4-16 frame clips where objects move, appear, disappear or change
  colour; detailed descriptions in several phrasings and QA (count, colour, position,
  relation, motion). {train_cfg.get('video_share', 0.3):.0%} of the joint batches are clips.
  Training stills are drawn by task: {image_tasks} ("qa" = the generator's own
  question mix; the held-out sets below use the generator's mix unchanged).
- Time: {metrics['train_seconds'] / 60:.1f} minutes on 2 CPU cores, {metrics['train_steps']} steps
  ({metrics['train_steps'] * metrics['batch_size']} samples), final loss {metrics['final_loss']}.

## Measured quality (greedy decoding, held-out seeds)
| metric | value | target |
|---|---|---|
| descriptions naming every object's colour+shape ({metrics['n_scenes']} scenes) | {metrics['describe_all_objects']:.1%} | >= 90% |
| count questions: final number right ({metrics['n_scenes']} scenes) | {metrics['count_accuracy']:.1%} | >= 85% |
| motion statements exactly right ({metrics['n_clips']} clips) | {metrics['motion_accuracy']:.1%} | >= 80% |

Reproduce: `python -m specvlm_core tiny-eval --model assets/tiny-vlm`.

{status}
{diagnostics}
{probe_table}

Examples:
{examples}
"""
    path = folder / "README.md"
    path.write_text(card)
    return path
