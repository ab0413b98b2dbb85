"""``foveal explain``: heat-map overlays of CAM (or any registered) explainers, per image and as
one comparison grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import InputError
from .options import load_model

HELP = """\
Explain a model's predictions on images with one or more explainers and write PNGs:
DIR/<image>_<method>.png (heat map over the image) and DIR/grid.png (rows: the images and
each method, columns: images).

--model is a registry model name (`foveal list --kind model`), a foveal checkpoint
(.safetensors written by foveal.save), or a timm model name. timm models are built with random
weights: nothing is downloaded; give --weights FILE for a local timm .safetensors/.pth file.
"""


def add_commands(sub) -> None:
    p = sub.add_parser("explain", help="write saliency overlays and a comparison grid",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--model", required=True, help="registry model name, foveal checkpoint path, or timm model name")
    p.add_argument("--weights", help="local weights file for a timm model (.safetensors/.pth; no downloads)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a timm model (default: timm's)")
    p.add_argument("--method", action="append", dest="methods", metavar="NAME",
                   help="explainer name, repeatable (default: grad-cam); see `foveal list --kind explainer`")
    p.add_argument("--layer", help="target layer (dotted module name); default: chosen automatically")
    p.add_argument("--target", type=int, default=None, help="class index to explain (default: the top class)")
    p.add_argument("--size", default="224", metavar="N|HxW",
                   help="resize images to N x N or H x W (e.g. 224 or 256x320) before explaining (default 224)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity (default 0.5)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    import torch

    from .. import registry, viz
    from ..data.images import list_images, read_rgb, to_tensor

    methods = args.methods or ["grad-cam"]
    for m in methods:
        if registry.entry(m).kind != "explainer":
            raise InputError(f"--method {m!r} is a {registry.entry(m).kind}, not an explainer")
    try:
        dims = [int(v) for v in args.size.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise InputError(f"--size: expected N or HxW with positive integers, got {args.size!r}")
    size = (dims[0], dims[-1])
    files: list[Path] = []
    for item in args.images:
        p = Path(item)
        files += list_images(p) if p.is_dir() else [p]
    if not files:
        raise InputError("no images found in the given folders")
    from ..core.tensors import resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model, args.weights, args.num_classes).to(device).eval()
    rgbs = [read_rgb(f, size) for f in files]
    batch = torch.stack([to_tensor(r) for r in rgbs]).to(device)
    out = Path(args.out)
    rows = {"image": rgbs}
    for m in methods:
        overrides = {"target_layer": args.layer} if args.layer else {}
        explainer = registry.build(m, **overrides)
        maps = torch.cat([explainer.explain(model, batch[i : i + 1], args.target) for i in range(len(files))])
        maps = maps.cpu().numpy()
        row = []
        for f, rgb, sal in zip(files, rgbs, maps):
            overlay = viz.heatmap_overlay(rgb, sal, alpha=args.alpha)
            viz.save_image(overlay, out / f"{f.stem}_{registry.entry(m).name}.png")
            row.append(overlay)
        rows[m] = row
    grid = viz.grid(list(rows.values()), row_labels=list(rows), col_labels=[f.stem[:12] for f in files])
    path = viz.save_image(grid, out / "grid.png")
    print(f"wrote {len(files) * len(methods)} overlays and {path}")
    return 0
