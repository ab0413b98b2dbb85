"""``foveal wsss --out DIR``: ViT explanations -> AffinityNet -> pseudo-masks, with mIoU."""

from __future__ import annotations

from .options import json_object


def add_commands(sub) -> None:
    p = sub.add_parser(
        "wsss",
        help="weakly-supervised segmentation: ViT classifier -> vit-lrp seeds -> AffinityNet random walk",
        description="Runs the pipeline of vit-lrp-affinitynet.txt (sections 4.3, 5.3) on a synthetic multi-object "
        "set: trains a ViT from image-level labels, explains each present class (vit-lrp), derives affinity "
        "labels, trains AffinityNet, refines the seeds by a random walk, and reports the mIoU of the seed masks "
        "and of the refined pseudo-masks against the ground truth. Writes OUT/result.json, OUT/examples.png and "
        "OUT/affinitynet/ (checkpoints, log.jsonl).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=64, help="synthetic training images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--classes", type=int, default=3, help="object classes (1-8)")
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--vit", default="vit_tiny_patch16_224", help="timm ViT of the classifier")
    p.add_argument("--vit-kwargs", type=json_object, default=None,
                   help='JSON of extra timm arguments, e.g. \'{"patch_size": 8, "depth": 4}\'')
    p.add_argument("--cls-epochs", type=int, default=30)
    p.add_argument("--explainer", default="vit-lrp", help="seed explainer (vit-lrp, attention-rollout, ...)")
    p.add_argument("--aff-epochs", type=int, default=8)
    p.add_argument("--aff-lr", type=float, default=0.1)
    p.add_argument("--affinity", type=json_object, default=None,
                   help='JSON of affinitynet overrides, e.g. \'{"crf": true, "walk": "squaring"}\'')
    p.add_argument("--examples", type=int, default=6, help="images in OUT/examples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_wsss)


def cmd_wsss(args) -> int:
    from ..pipelines.wsss import WSSSConfig, run_wsss

    values = dict(out=args.out, images=args.images, size=args.size, num_classes=args.classes,
                  max_objects=args.max_objects, vit=args.vit, cls_epochs=args.cls_epochs, explainer=args.explainer,
                  aff_epochs=args.aff_epochs, aff_lr=args.aff_lr, examples=args.examples, seed=args.seed,
                  device=args.device, progress=not args.quiet)
    if args.vit_kwargs is not None:
        values["vit_kwargs"] = args.vit_kwargs
    if args.affinity is not None:
        values["affinity_options"] = {**WSSSConfig().affinity_options, **args.affinity}
    result = run_wsss(**values)
    print(f"seed mIoU {result.seed_miou:.4f} -> refined mIoU {result.refined_miou:.4f} "
          f"(classifier accuracy {result.classifier_accuracy:.3f})")
    print(f"wrote {args.out}/result.json and {args.out}/examples.png")
    return 0
