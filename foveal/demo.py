"""The demo behind ``foveal demo`` and ``make demo``.

It builds every registered component family on synthetic data and prints what it did.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import registry


def synthetic_batch(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images (B, 3, size, size), roughly ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)


def run_demo(out: str | Path = "demo-output", data: str | None = None, quick: bool = False, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    summary: dict = {"components": {}}
    print(f"foveal demo: {len(registry.names())} registered components")
    for kind in ("backbone", "pooling", "model", "explainer", "metric", "refiner", "decoder"):
        names = registry.names(kind)
        summary["components"][kind] = names
        print(f"  {kind:<9} {', '.join(names) if names else '-'}")
    images = synthetic_batch(2, 64, seed)
    backbone = registry.build("timm-backbone", model_name="resnet18")
    with torch.no_grad():
        feats = backbone(images)
    print(f"timm-backbone resnet18 on {tuple(images.shape)}: features "
          + ", ".join(str(tuple(f.shape[1:])) for f in feats))
    pooled = registry.build("gap", in_channels=backbone.channels[-1])(feats[-1])
    print(f"gap pooling -> {tuple(pooled.shape)}")
    summary["seconds"] = time.perf_counter() - t0
    print(f"done in {summary['seconds']:.1f} s; output folder: {out.resolve()}")
    return summary
