"""A/B of tiny-train's vision phase alone: train the vision tower for N minutes on the
dense visual loss (tiny-train's optimiser, size buckets and schedule), then report
held-out shape accuracy over object tokens (64 scenes of 1-6 objects).

Usage: PYTHONPATH=. python docs/experiments/vision_ab.py MINUTES LR DENSE BATCH
  DENSE 1 = scenes of tiny_vlm.VISION_OBJECTS (5-9 objects), 0 = world.SCENE_OBJECTS (1-6).
Measured (2 CPU cores, 5 minutes each): 5 2e-3 1 32 -> 0.402; 5 2e-3 0 32 -> 0.348;
5 4e-3 1 32 -> 0.361.
"""
import json
import random
import sys
import time

import torch
from transformers import Qwen2VLForConditionalGeneration

from specvlm_core import tiny_vlm, world

minutes, lr, dense, batch_size = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
random.seed(0)
tokenizer = tiny_vlm.build_tokenizer()
processor = tiny_vlm.build_processor(tokenizer)
config = tiny_vlm.build_config(tokenizer)
visual = Qwen2VLForConditionalGeneration(config).model.visual
head = torch.nn.Linear(config.text_config.hidden_size, sum(tiny_vlm.AUX_CLASSES))
named = [("visual." + n, p) for n, p in visual.named_parameters()] + [("aux." + n, p) for n, p in head.named_parameters()]
optimizer = tiny_vlm.adamw(named, lr)
object_range = tiny_vlm.VISION_OBJECTS if dense else world.SCENE_OBJECTS
held_out = [world.make_sample(world.EVAL_SEED + 5 * 10**6 + i, kind="image") for i in range(64)]


def held_out_shape_accuracy() -> float:
    visual.eval()
    features, targets = [], []
    with torch.no_grad():
        for i in range(0, len(held_out), 16):
            pixels, grid = tiny_vlm.media_inputs(processor, held_out[i:i + 16], "image")
            features.append(visual(pixels, grid_thw=grid).pooler_output)
            targets.append(tiny_vlm.visual_token_targets(held_out[i:i + 16], grid))
    visual.train()
    return tiny_vlm.object_shape_accuracy(head, torch.cat(features), torch.cat(targets))


t0, step, budget = time.time(), 0, minutes * 60
while time.time() - t0 < budget:
    lo, hi = random.choice(tiny_vlm.SIZE_BUCKETS)
    samples = [world.make_sample(step * batch_size + i, kind="image", size_range=(lo, hi), object_range=object_range)
               for i in range(batch_size)]
    pixels, grid = tiny_vlm.media_inputs(processor, samples, "image")
    for group in optimizer.param_groups:
        group["lr"] = tiny_vlm.lr_at(step, (time.time() - t0) / budget, lr)
    loss = tiny_vlm.aux_visual_loss(head, visual(pixels, grid_thw=grid).pooler_output,
                                    tiny_vlm.visual_token_targets(samples, grid))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
    optimizer.step()
    step += 1
    if step % 100 == 0:
        print(json.dumps({"step": step, "seconds": round(time.time() - t0), "loss": round(loss.item(), 3),
                          "held_out_shape_accuracy": round(held_out_shape_accuracy(), 3)}), flush=True)
print(json.dumps({"args": sys.argv[1:], "steps": step, "held_out_shape_accuracy": round(held_out_shape_accuracy(), 3)}))
