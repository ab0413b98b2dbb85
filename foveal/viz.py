"""Pictures people look at: heat-map and mask overlays, labelled grids, embedded PNGs."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """Map values in [0, 1] (H, W) to uint8 RGB (H, W, 3) with a matplotlib colormap."""
    from matplotlib import colormaps

    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    return (colormaps[name](v)[..., :3] * 255).round().astype(np.uint8)


def heatmap_overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a saliency map in [0, 1] (H, W) over a uint8 RGB image (H, W, 3)."""
    if image.shape[:2] != saliency.shape:
        raise ValueError(f"heatmap_overlay: image {image.shape[:2]} and map {saliency.shape} differ in size")
    heat = colormap(saliency, cmap).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    return out.round().clip(0, 255).astype(np.uint8)


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, color: Sequence[int] = (0, 255, 0), alpha: float = 0.45,
    contour: bool = True,
) -> np.ndarray:
    """Tint a bool mask (H, W) over a uint8 RGB image and draw its outline."""
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    if contour:
        edge = m & ~_erode(m)
        out[edge] = np.asarray(color, np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour an integer label map (H, W) (0 = background, left untouched) over an image."""
    palette = colormap(np.linspace(0, 1, 10), "tab10")
    out = image.astype(np.float32).copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        m = labels == c
        out[m] = (1 - alpha) * out[m] + alpha * palette[(int(c) - 1) % 10]
    return out.round().clip(0, 255).astype(np.uint8)


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, mode="edge")
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def grid(
    cells: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 4,
    background: int = 255,
) -> np.ndarray:
    """Tile uint8 RGB images (rows x cols, all cells resized to the first cell's size) into one
    image with optional row and column labels."""
    rows = [list(r) for r in cells]
    if not rows or not rows[0]:
        raise ValueError("grid: expected at least one cell")
    h, w = rows[0][0].shape[:2]
    font = ImageFont.load_default()
    left = (max(len(s) for s in row_labels) * 7 + 2 * pad) if row_labels else 0
    top = 18 if col_labels else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncols * (w + pad) + pad, top + len(rows) * (h + pad) + pad),
                       (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels or []):
        draw.text((left + pad + j * (w + pad), 3), str(label), fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((pad, y + h // 2 - 5), str(row_labels[i]), fill=(0, 0, 0), font=font)
        for j, cell in enumerate(row):
            im = Image.fromarray(_rgb(cell))
            if im.size != (w, h):
                im = im.resize((w, h), Image.NEAREST)
            canvas.paste(im, (left + pad + j * (w + pad), y))
    return np.asarray(canvas)


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a.astype(np.uint8))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(array)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(array: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI for embedding in a self-contained HTML report."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def save_image(array: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array))
    return path
