"""Weakly-supervised segmentation from ViT explanations, end to end (vit-lrp-affinitynet.txt).

1. Table 4 analogue: a ViT trained from image-level labels on the synthetic multi-object set,
   ``vit-lrp`` seeds, AffinityNet trained on the seeds' affinity labels, random walk; mIoU of the
   seed masks and of the refined pseudo-masks (``foveal.pipelines.wsss.run_wsss``).
2. Tables 2/3 analogue on the same classifier: positive / negative perturbation AUC (target
   class) and saliency segmentation (pixel accuracy, mAP, mIoU at the map mean) of ``vit-lrp``
   and its baselines, with the registered ``perturbation-auc`` and ``saliency-segmentation``
   metrics.

    .venv/bin/python examples/wsss_pipeline.py --out runs/wsss          # a few minutes on a CPU
    .venv/bin/python examples/wsss_pipeline.py --out runs/wsss --quick  # smaller, for a smoke test

Running it again into the same folder resumes the run there (finished stages are not redone). The
same pipeline runs on PASCAL VOC 2012 with ``foveal wsss --dataset voc --data-root ROOT`` (docs/wsss.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from foveal import registry
from foveal.pipelines.wsss import run_wsss

EXPLAINERS = ["vit-lrp", "partial-lrp", "attention-rollout", "vit-raw-attention", "attn-grad-cam"]


def explainer_table(result, max_images: int = 64) -> str:
    """Markdown table of the explainers on (image, first present class) pairs."""
    data, model = result.data, result.classifier
    n = min(max_images, len(data))
    images = data.images[:n]
    targets = data.labels[:n].argmax(1)  # the first present class of each image
    masks = data.masks[:n] == (targets + 1)[:, None, None]
    metrics = {
        "positive AUC (lower better)": registry.build("perturbation-auc", mode="positive"),
        "negative AUC (higher better)": registry.build("perturbation-auc", mode="negative"),
    }
    seg = {q: registry.build("saliency-segmentation", quantity=q) for q in ("pixel-accuracy", "ap", "miou")}
    device = next(model.parameters()).device
    rows = []
    for name in EXPLAINERS:
        maps = torch.cat([registry.build(name).explain(model, images[i : i + 16].to(device), targets[i : i + 16])
                          for i in range(0, n, 16)]).cpu()
        values = [100 * m.aggregate(m.compute(model, images.to(device), maps.to(device), targets).cpu())
                  for m in metrics.values()]
        values += [100 * m.score(maps, masks) for m in seg.values()]
        rows.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    header = "| explainer | " + " | ".join(metrics) + " | pixel acc | mAP | mIoU |"
    return "\n".join([header, "|" + "---|" * (len(metrics) + 4), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/wsss")
    parser.add_argument("--quick", action="store_true", help="32 images of 64 px, fewer epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = dict(images=32, cls_epochs=20, aff_epochs=4) if args.quick else {}
    resume = Path(args.out, "config.json").exists()  # a second run continues the first
    result = run_wsss(out=args.out, seed=args.seed, resume=resume, **options)
    print(f"\nseed mIoU {100 * result.seed_miou:.1f} -> AffinityNet mIoU {100 * result.refined_miou:.1f}")
    for name, a, b in zip(["background", *result.classes], result.seed_iou, result.refined_iou):
        print(f"  {name:<12} {100 * a:5.1f} -> {100 * b:5.1f}")
    table = explainer_table(result)
    print("\n" + table)
    Path(args.out, "explainers.md").write_text(table + "\n")
    print(f"\nwrote {args.out}/examples.png, {args.out}/report.html, {args.out}/result.json, {args.out}/explainers.md")


if __name__ == "__main__":
    main()
