"""``foveal wsss --out DIR``: ViT explanations -> AffinityNet -> pseudo-masks, with mIoU, on the built-in
synthetic set or a dataset on disk (PASCAL VOC 2012)."""

from __future__ import annotations

from .options import json_object


def add_commands(sub) -> None:
    p = sub.add_parser(
        "wsss",
        help="weakly-supervised segmentation: ViT classifier -> vit-lrp seeds -> AffinityNet random walk",
        description="Runs the pipeline of vit-lrp-affinitynet.txt (sections 4.3, 5.3-5.4) on the built-in synthetic "
        "multi-object set (no data arguments) or on a dataset with image-level labels (--dataset voc --data-root "
        "ROOT): fine-tunes a ViT multi-label (or takes --classifier), writes one seed file per image "
        "(OUT/seeds/<id>.npz), trains AffinityNet from them, writes the seed and refined masks as VOC palette PNGs "
        "(OUT/masks/<variant>/<id>.png) and reports the pooled mIoU of seeds, seeds+CRF, refined and refined+CRF "
        "(OUT/result.json, OUT/report.html). Every stage resumes with --resume; under torchrun the training stages "
        "run DDP and the per-image stages are split over the processes. See docs/wsss.md.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (finished images and epochs skip)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in OUT (its files only) and start afresh")
    p.add_argument("--stop-after", choices=("classifier", "seeds", "affinity", "walk"), default=None,
                   help="stop after this stage")
    p.add_argument("--preset", choices=("synthetic", "voc"), default=None,
                   help="defaults: synthetic without a dataset, voc (the paper's settings) with one")
    g = p.add_argument_group("data (default: the built-in synthetic set)")
    g.add_argument("--dataset", default=None, help="dataset kind with image-level labels, e.g. voc")
    g.add_argument("--data-root", default=None, help="dataset root (VOC: folder holding VOCdevkit, or below it)")
    g.add_argument("--split", default=None, help="training split or list file (VOC: train, train_aug; default train)")
    g.add_argument("--eval-split", default=None, help="split that gets pseudo-masks and mIoU (default: --split)")
    g.add_argument("--masks", choices=("auto", "class", "aug", "none"), default="auto",
                   help="VOC ground truth for the evaluation: SegmentationClass, SegmentationClassAug, either, none")
    g.add_argument("--cls-labels", default=None, help="psa's cls_labels.npy for the image-level labels (trusted file)")
    g.add_argument("--images", type=int, default=None, help="synthetic images (64)")
    g.add_argument("--size", type=int, default=None, help="synthetic image side in pixels (64)")
    g.add_argument("--classes", type=int, default=None, help="synthetic object classes, 1-8 (3)")
    g.add_argument("--max-objects", type=int, default=None)
    g = p.add_argument_group("classifier")
    g.add_argument("--classifier", default=None, help="trained classifier file (OUT/classifier/classifier."
                   "safetensors of an earlier run, or a timm state dict with --vit): skip training")
    g.add_argument("--vit", default=None, help="timm ViT, e.g. vit_base_patch16_224 (preset)")
    g.add_argument("--weights", default=None, help="local ImageNet-pretrained timm weights of --vit")
    g.add_argument("--vit-kwargs", type=json_object, default=None,
                   help='JSON of extra timm arguments, e.g. \'{"patch_size": 8, "depth": 4}\'')
    g.add_argument("--image-size", type=int, default=None, help="classifier input side (voc preset: 448)")
    g.add_argument("--cls-epochs", type=int, default=None)
    g.add_argument("--cls-lr", type=float, default=None)
    g.add_argument("--cls-batch-size", type=int, default=None)
    g = p.add_argument_group("seeds and AffinityNet")
    g.add_argument("--explainer", default="vit-lrp", help="seed explainer (vit-lrp, attention-rollout, ...)")
    g.add_argument("--explainer-options", type=json_object, default=None, help="JSON of explainer options")
    g.add_argument("--backbone", default=None, help="timm CNN of AffinityNet (voc preset: resnet50; psa: ResNet-38)")
    g.add_argument("--backbone-weights", default=None, help="local ImageNet-pretrained weights of --backbone")
    g.add_argument("--walk-preset", choices=("psa", "paper"), default=None,
                   help="random walk beta/t: psa 8/256 (default), paper 16/8")
    g.add_argument("--all-pairs", action="store_true", help="every pair in the radius, not only psa's")
    g.add_argument("--crf-labels", action="store_true",
                   help="dense CRF on the affinity labels (psa; needs foveal[crf])")
    g.add_argument("--aff-epochs", type=int, default=None)
    g.add_argument("--aff-lr", type=float, default=None)
    g.add_argument("--aff-batch-size", type=int, default=None)
    g.add_argument("--aff-crop", type=int, default=None, help="AffinityNet random crop side (voc preset: 448)")
    g.add_argument("--affinity", type=json_object, default=None,
                   help='JSON of affinitynet overrides, e.g. \'{"freeze_levels": 0, "walk": "squaring"}\'')
    g = p.add_argument_group("outputs")
    g.add_argument("--pseudo-ignore", type=float, default=None,
                   help="pseudo-mask pixels with refined probability below this become 255")
    g.add_argument("--crf", choices=("auto", "on", "off"), default="auto",
                   help="seeds+CRF / refined+CRF rows: auto = when pydensecrf2 is installed")
    g.add_argument("--examples", type=int, default=6, help="images in OUT/examples.png and the report")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the training stages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_wsss)


def config_from_args(args) -> dict:
    """The :class:`~foveal.pipelines.wsss.WSSSConfig` values an argument namespace sets."""
    values = dict(out=args.out, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                  preset=args.preset,
                  dataset=args.dataset, data_root=args.data_root, split=args.split, eval_split=args.eval_split,
                  masks=None if args.masks == "none" else args.masks, cls_labels=args.cls_labels,
                  classifier=args.classifier, weights=args.weights, explainer=args.explainer,
                  pseudo_ignore=args.pseudo_ignore, crf_eval={"auto": None, "on": True, "off": False}[args.crf],
                  examples=args.examples, workers=args.workers, seed=args.seed, device=args.device,
                  progress=not args.quiet)
    optional = {"images": args.images, "size": args.size, "num_classes": args.classes,
                "max_objects": args.max_objects, "vit": args.vit, "vit_kwargs": args.vit_kwargs,
                "image_size": args.image_size, "cls_epochs": args.cls_epochs, "cls_lr": args.cls_lr,
                "cls_batch_size": args.cls_batch_size, "explainer_options": args.explainer_options,
                "aff_epochs": args.aff_epochs, "aff_lr": args.aff_lr, "aff_batch_size": args.aff_batch_size,
                "aff_crop": args.aff_crop}
    values.update({k: v for k, v in optional.items() if v is not None})
    affinity = dict(args.affinity or {})
    if args.backbone:
        affinity["backbone_options"] = {**affinity.get("backbone_options", {}), "model_name": args.backbone}
    for key, value in (("backbone_weights", args.backbone_weights), ("walk_preset", args.walk_preset)):
        if value is not None:
            affinity[key] = value
    if args.all_pairs:
        affinity["pairs"] = "all"
    if args.crf_labels:
        affinity["crf"] = True
    if affinity:
        values["affinity_options"] = affinity
    return values


def cmd_wsss(args) -> int:
    from ..pipelines.wsss import run_wsss

    result = run_wsss(**config_from_args(args))
    if result is None:  # stopped early, or a torchrun process other than rank 0
        return 0
    for variant, value in result.miou.items():
        print(f"{variant:<12} mIoU {value:.4f}")
    print(f"seed mIoU {result.seed_miou:.4f} -> refined mIoU {result.refined_miou:.4f} "
          f"(classifier accuracy {result.classifier_accuracy:.3f})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {args.out}/result.json, {args.out}/report.html and {args.out}/examples.png")
    return 0
