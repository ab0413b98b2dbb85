"""A self-contained HTML report (images embedded as data URIs, no external files or scripts)."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .viz import png_data_uri

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#1d2430;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #e3e7ee;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em} th,td{border:1px solid #d5dae3;padding:.3em .7em;
text-align:right} th{background:#f2f4f8} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top} figure img{max-width:100%;
border:1px solid #d5dae3} figcaption{font-size:.9em;color:#56607a} .note{color:#56607a}
"""


class Report:
    """Collects sections of text, tables and images and writes one HTML file."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self._parts: list[str] = []

    def section(self, title: str, text: str = "") -> Report:
        self._parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            self.text(text)
        return self

    def text(self, text: str, css_class: str = "") -> Report:
        cls = f' class="{css_class}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], caption: str = "", digits: int = 4) -> Report:
        """A table from a list of dicts (columns: union of keys, in first-seen order)."""
        if not rows:
            raise ValueError(f"report table {caption!r} has no rows")
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, ''), digits))}</td>" for c in cols) + "</tr>"
            for r in rows
        )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self._parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def image(self, image: np.ndarray | str | os.PathLike, caption: str = "", width: int | None = None) -> Report:
        """Embed a uint8 image array (or a PNG file) as a data URI."""
        if not isinstance(image, np.ndarray):
            from PIL import Image

            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        style = f' style="width:{width}px"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure><img src="{png_data_uri(image)}" alt="{html.escape(caption)}"{style}>{cap}</figure>'
        )
        return self

    def to_html(self) -> str:
        sub = f'<p class="note">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{sub}{''.join(self._parts)}</body></html>"
        )

    def write(self, path: str | os.PathLike) -> Path:
        from .core.checkpoint import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.to_html().encode("utf-8"), path)
        return path


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def plot_curves(series: Mapping[str, Sequence[float]], xlabel: str = "epoch", ylabel: str = "",
                title: str = "") -> np.ndarray:
    """A line plot (uint8 RGB array) of named series, for reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), list(ys), marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
