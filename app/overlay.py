"""What the compressor kept, drawn on the input: the visual-token grid over the image
(or over the first frames of a clip) with the kept cells shaded (PIL only)."""
from __future__ import annotations

from PIL import Image, ImageDraw

KEPT = (22, 163, 74)  # green, as the accepted path in the tree plots
DROPPED = (15, 23, 42)


def _panel(image: Image.Image, rows: int, cols: int, kept: set[tuple[int, int]], size: int) -> Image.Image:
    """One frame, scaled so its longer side is `size`, with the grid and kept cells."""
    img = image.convert("RGB")
    scale = size / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
                     if scale > 1 else Image.BILINEAR)
    shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    cw, ch = img.width / cols, img.height / rows
    for r in range(rows):
        for c in range(cols):
            box = (round(c * cw), round(r * ch), round((c + 1) * cw) - 1, round((r + 1) * ch) - 1)
            if (r, c) in kept:
                draw.rectangle(box, fill=KEPT + (90,), outline=KEPT + (255,), width=2)
            else:
                draw.rectangle(box, fill=DROPPED + (120,))
    out = Image.alpha_composite(img.convert("RGBA"), shade)
    lines = ImageDraw.Draw(out)
    for c in range(1, cols):
        x = round(c * cw)
        lines.line([(x, 0), (x, out.height)], fill=(255, 255, 255, 110), width=1)
    for r in range(1, rows):
        y = round(r * ch)
        lines.line([(0, y), (out.width, y)], fill=(255, 255, 255, 110), width=1)
    return out.convert("RGB")


def kept_cells_overlay(image: Image.Image | None, frames: list | None, grid, kept_cells, max_panels: int = 4,
                       size: int = 320) -> Image.Image | None:
    """The token grid (t, rows, cols) over the image, or over the first `max_panels`
    temporal slices of a clip (each slice shown on its first frame), kept cells
    shaded green and dropped ones darkened. None when there is nothing to draw on."""
    if not grid or kept_cells is None:
        return None
    t, rows, cols = (max(1, int(v)) for v in grid)
    if image is not None:
        sources = [image] * min(t, max_panels)
    elif frames:
        per_slice = max(1, len(frames) // t)
        sources = [frames[min(len(frames) - 1, i * per_slice)] for i in range(min(t, max_panels))]
    else:
        return None
    kept: dict[int, set] = {}
    for cell in kept_cells:
        f, r, c = (int(v) for v in cell)
        kept.setdefault(f, set()).add((r, c))
    panels = [_panel(src, rows, cols, kept.get(i, set()), size) for i, src in enumerate(sources)]
    gap, label_h = 8, 18
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels) + label_h
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    n_total = t * rows * cols
    for i, p in enumerate(panels):
        sheet.paste(p, (x, label_h))
        n_kept = len(kept.get(i, ()))
        label = f"kept {n_kept}/{rows * cols}" if t == 1 else f"slice {i + 1}/{t}: kept {n_kept}/{rows * cols}"
        draw.text((x + 2, 3), label, fill="black")
        x += p.width + gap
    if t > len(panels):
        draw.text((max(0, width - 150), 3), f"(+{t - len(panels)} slices, {n_total} cells)", fill="#475569")
    return sheet
