"""Example inputs for the app, rendered from the world generator with fixed seeds.

    python -m specvlm_core.examples [out_dir]     # default: assets/examples/

Writes four PNG scenes of different sizes, two mp4 clips, one animated GIF, and
examples.json, which lists each file with a question and the ground-truth answer. The
same seeds always give the same files.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import world
from .media import write_gif, write_video

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
CLIP_FPS = 4


@dataclass(frozen=True)
class ExampleSpec:
    """One example file: which world sample to render, at which size, in which format."""

    file: str
    seed: int
    task: str  # a world task: "describe", "count", "position", "motion", ...
    longest_side: int  # of the image or of every video frame


# Seeds are chosen so the scenes differ and the mp4 clips have 8 and 16 frames. The GIF
# holds fewer frames than its clip: GIF writers merge repeated frames into longer ones.
IMAGE_EXAMPLES = (
    ExampleSpec("shapes_96.png", 4, "describe", 96),
    ExampleSpec("shapes_160.png", 3, "count", 160),
    ExampleSpec("shapes_256.png", 1, "position", 256),
    ExampleSpec("shapes_384.png", 5, "describe", 384),
)
VIDEO_EXAMPLES = (
    ExampleSpec("clip_8_frames.mp4", 4, "motion", 160),
    ExampleSpec("clip_16_frames.mp4", 5, "describe", 160),
    ExampleSpec("clip_animated.gif", 10, "motion", 128),
)


def write_examples(out_dir=DEFAULT_OUT_DIR) -> list[dict]:
    """Write the example files and examples.json into out_dir; return the listed entries."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in IMAGE_EXAMPLES:
        sample = world.make_sample(spec.seed, kind="image", task=spec.task,
                                   size_range=(spec.longest_side, spec.longest_side))
        sample.frames[0].save(out_dir / spec.file, optimize=True)
        entries.append(_entry(spec, sample))
    for spec in VIDEO_EXAMPLES:
        sample = world.make_sample(spec.seed, kind="video", task=spec.task,
                                   video_size_range=(spec.longest_side, spec.longest_side))
        write = write_gif if spec.file.endswith(".gif") else write_video
        write(sample.frames, out_dir / spec.file, fps=CLIP_FPS)
        entries.append(_entry(spec, sample))
    (out_dir / "examples.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return entries


def _entry(spec: ExampleSpec, sample: world.Sample) -> dict:
    return {"file": spec.file, "kind": sample.kind, "question": sample.question,
            "answer": sample.answer, "task": sample.task, "seed": spec.seed}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT_DIR
    for entry in write_examples(target):
        print(f"{target / entry['file']}: {entry['question']}")
