"""A/B of tiny-train's vision phase alone: train the vision tower for N minutes on the
dense visual loss, then report held-out shape accuracy over object tokens.

Usage: PYTHONPATH=. python docs/experiments/vision_ab.py MINUTES LR DENSE BATCH
  DENSE 1 = scenes of 5-9 objects (tiny_vlm.VISION_OBJECTS), 0 = 1-6 objects.
Measured (2 CPU cores, 5 minutes each, 64 held-out scenes): 5 2e-3 1 32 -> 0.463;
5 2e-3 0 32 -> 0.399; 5 4e-3 1 32 -> 0.424.
"""
import random, sys, time, json
import torch
from specvlm_core import tiny_vlm as tv, world

minutes, lr, dense, bs = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0); random.seed(0)
tok = tv.build_tokenizer(); proc = tv.build_processor(tok); cfg = tv.build_config(tok)
from transformers import Qwen2VLForConditionalGeneration
model = Qwen2VLForConditionalGeneration(cfg)
visual = model.model.visual
head = torch.nn.Linear(cfg.text_config.hidden_size, sum(tv.AUX_CLASSES))
named = [("v." + n, p) for n, p in visual.named_parameters()] + [("a." + n, p) for n, p in head.named_parameters()]
opt = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.05},
                         {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))

def scene(seed, lo, hi, nmin, nmax):
    rng = random.Random(seed)
    objs = world.random_objects(rng, rng.randint(nmin, nmax))
    w, h = world.random_canvas(rng, lo, hi)
    return world.Sample("image", [world.render(objs, w, h, rng.choice(world.BACKGROUNDS))], "", "", "describe", tuple(objs))

held = [scene(world.EVAL_SEED + 5 * 10**6 + i, 64, 384, 1, 6) for i in range(64)]
def held_acc():
    visual.eval(); right = tot = 0
    with torch.no_grad():
        for i in range(0, 64, 16):
            s = held[i:i + 16]
            px, grid = tv.media_inputs(proc, s, "image")
            f = visual(px, grid_thw=grid).pooler_output
            t = tv.visual_token_targets(s, grid)
            on = t[:, 1] > 0
            pred = head(f[on]).split(tv.AUX_CLASSES, -1)[1].argmax(-1)
            right += (pred == t[on, 1]).sum().item(); tot += on.sum().item()
    visual.train(); return right / tot

t0 = time.time(); step = 0; cursor = 0; budget = minutes * 60
while time.time() - t0 < budget:
    lo, hi = random.choice([(64, 128), (64, 128), (128, 224), (224, 384)])
    nmin, nmax = (5, 9) if dense else (1, 6)
    s = [scene(cursor + i, lo, hi, nmin, nmax) for i in range(bs)]; cursor += bs
    px, grid = tv.media_inputs(proc, s, "image")
    lr_now = tv.lr_at(step, (time.time() - t0) / budget, lr)
    for g in opt.param_groups: g["lr"] = lr_now
    f = visual(px, grid_thw=grid).pooler_output
    loss = tv.aux_visual_loss(head, f, tv.visual_token_targets(s, grid))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0); opt.step()
    step += 1
    if step % 100 == 0:
        print(json.dumps({"step": step, "s": round(time.time() - t0), "loss": round(loss.item(), 3), "held": round(held_acc(), 3)}), flush=True)
print("FINAL", sys.argv[1:], step, round(held_acc(), 3), flush=True)
