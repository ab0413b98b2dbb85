"""``foveal evaluate-explanations``: score explainers with explanation metrics on images or on a
dataset (ImageNet, ImageNet-segmentation, VOC, polyps, folders), through :func:`foveal.evaluation.evaluate`.

Writes, in ``--out``: ``evaluation.json`` (configuration and hash), ``records.jsonl`` (one line per
image, explainer and explained class), ``results.json`` (config, per-image values, dataset values,
bootstrap intervals, timing), ``results.md`` (one row per explainer, one column per metric),
``results.png`` (one bar chart per metric with interval whiskers), ``maps.png`` (the first images
with each explainer's map) and ``report.html``. Resumes an interrupted run unless ``--overwrite``;
under ``torchrun`` every process evaluates its share and rank 0 merges.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InputError
from .options import build_component, load_model, parse_spec  # noqa: F401 (parse_spec: public here too)

DESCRIPTION = """\
Score saliency explainers on images with chosen metrics.

Images: files and/or folders (positional), or --dataset KIND --data-root ROOT [--split NAME]
with KIND one of imagenet, imagenet-seg, voc, polyp, folder (see docs/datasets.md).
Components are given as NAME or NAME:key=value,key=value (values are parsed as JSON when
possible, e.g. insertion:steps=50,baseline="zero" or perturbation-auc:mode=negative).
--protocol NAME sets the explainers, metrics, classes and geometry of a paper's experiment
(--list-protocols); --method then replaces its explainers and --metric adds metrics.
--model is a foveal checkpoint file, a registered model (e.g. gap-classifier:model_name=resnet50),
or a timm model NAME / timm:NAME (random weights; add --weights FILE for trained ones).
Inputs are normalised with the timm model's pretrained_cfg mean/std when it has them, else
ImageNet's (foveal checkpoints); --mean/--std override. Metrics that black out pixels use the same.
--targets: the class explained (label = the dataset's, predicted, or an index; several settings
comma-separated). Localisation and segmentation metrics (pointing-game, saliency-segmentation,
dice, ...) need masks: --masks DIR with image files, or a dataset with masks; for ImageNet val
--boxes LOC_val_solution.csv turns the bounding boxes into masks.
Multi-GPU / multi-process: torchrun --nproc_per_node N -m foveal.cli evaluate-explanations ...
"""


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate-explanations", help="score explainers on images with explanation metrics",
                       description=DESCRIPTION, formatter_class=_raw_formatter())
    p.add_argument("images", nargs="*", help="image files and/or folders of images (or use --dataset)")
    p.add_argument("--dataset", default=None, metavar="KIND",
                   help="imagenet, imagenet-seg, voc, polyp or folder (with --data-root)")
    p.add_argument("--data-root", default=None, metavar="ROOT", help="dataset root (file or folder)")
    p.add_argument("--split", default=None, help="dataset split (imagenet: val; voc: val; polyp: a test set)")
    p.add_argument("--boxes", default=None, metavar="CSV",
                   help="ImageNet: Kaggle's LOC_val_solution.csv; its bounding boxes become the masks")
    p.add_argument("--model", default=None, help="checkpoint path, registered model NAME[:k=v,...], or timm NAME")
    p.add_argument("--weights", default=None, help="weights file (.pth/.safetensors) loaded into a timm model")
    p.add_argument("--method", action="append", default=None, metavar="EXPLAINER",
                   help="registered explainer, NAME[:k=v,...] (repeatable)")
    p.add_argument("--metric", action="append", default=None, metavar="METRIC",
                   help="registered metric, NAME[:k=v,...] (repeatable)")
    p.add_argument("--protocol", default=None, help="a paper's setting (see --list-protocols)")
    p.add_argument("--list-protocols", action="store_true", help="describe the protocol presets and exit")
    p.add_argument("--masks", default=None, help="folder of ground-truth masks (same file stems as the images)")
    p.add_argument("--out", default=None, help="output folder (required)")
    p.add_argument("--targets", default=None, metavar="WHICH",
                   help="class explained: label, predicted or INT; several comma-separated (default: predicted, "
                        "or the protocol's)")
    p.add_argument("--target", type=int, default=None, help="class to explain and score (same as --targets INT)")
    p.add_argument("--metric-targets", default=None, metavar="WHICH",
                   help="class the metrics score (label, predicted or INT; default: the explained one)")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                   help="resize images to SIZE or H W (default: the protocol's, else 224)")
    p.add_argument("--resize", choices=("resize", "resize-crop", "none"), default=None,
                   help="geometry: straight resize, short side + centre crop, or none (default: the protocol's, "
                        "else the dataset's)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="input normalisation mean (default: the model's)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="input normalisation std (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming the run in --out")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of random explainers")
    p.add_argument("--device", default=None, help="torch device (default: cuda[:LOCAL_RANK] if available, else cpu)")
    p.add_argument("--grid", type=int, default=4, help="images shown in maps.png and report.html (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate_explanations)


def _raw_formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _size(args, protocol) -> tuple[int, int] | None:
    if args.size is None:
        s = protocol.size if protocol else 224
        return (s, s)
    size = tuple(args.size) * 2 if len(args.size) == 1 else tuple(args.size)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"--size: expected SIZE or H W (positive), got {args.size}")
    return size


def _targets(args, protocol) -> tuple[Any, Any]:
    if args.target is not None and args.targets is not None:
        raise InputError("--target and --targets: give one of them")
    if args.target is not None:
        targets: Any = args.target
    elif args.targets is not None:
        parts = [t.strip() for t in args.targets.split(",") if t.strip()]
        targets = parts[0] if len(parts) == 1 else tuple(parts)
    else:
        targets = protocol.targets if protocol else "predicted"
    metric_targets = args.metric_targets if args.metric_targets is not None else (
        protocol.metric_targets if protocol else None)
    return targets, metric_targets


def _build_metric(spec: str, mean, std):
    """A metric from its spec, given the data's mean/std unless the spec sets them."""
    from .. import registry

    metric = build_component(spec, "metric")
    name, opts = parse_spec(spec)
    fields = registry.info(name)["fields"]
    if "mean" in fields and "std" in fields and "mean" not in opts and "std" not in opts:
        metric = registry.build(name, **opts, mean=list(mean), std=list(std))
    return metric


def _open_dataset(args, size, resize, mean, std):
    from ..data.datasets import FolderDataset, open_dataset
    from ..evaluation.items import BoxMasks

    geometry = {"size": None if resize == "none" else size, "resize": resize, "mean": mean, "std": std}
    if args.images and args.dataset:
        raise InputError("give image files/folders or --dataset KIND --data-root ROOT, not both")
    if args.images:
        if args.data_root or args.split or args.boxes:
            raise InputError("--data-root, --split and --boxes go with --dataset")
        return FolderDataset(args.images, mask_folder=args.masks, **{**geometry, "resize": resize or "resize"})
    if not args.dataset:
        raise InputError("no images: give image files/folders, or --dataset KIND --data-root ROOT")
    if not args.data_root:
        raise InputError(f"--dataset {args.dataset}: give --data-root ROOT")
    kind = args.dataset.strip().lower().replace("_", "-")
    options = dict(geometry)
    if args.masks:
        if kind != "folder":
            raise InputError(f"--masks goes with image files or --dataset folder, not --dataset {args.dataset}")
        options["mask_folder"] = args.masks
    dataset = open_dataset(kind, args.data_root, args.split, **options)
    if args.boxes:
        if kind != "imagenet":
            raise InputError(f"--boxes (ImageNet bounding boxes) goes with --dataset imagenet, not {args.dataset}")
        dataset = BoxMasks(dataset, args.boxes)
    return dataset


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------
def cmd_evaluate_explanations(args) -> int:
    import torch.distributed as dist

    from ..core.training import distributed_env, init_distributed, training_device
    from ..evaluation import evaluate, get_protocol, list_protocols
    from ..evaluation.outputs import results_markdown, write_outputs
    from .options import input_normalization

    if args.list_protocols:
        print(list_protocols())
        return 0
    if not args.model or not args.out:
        raise InputError("evaluate-explanations needs --model and --out (or --list-protocols)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    protocol = get_protocol(args.protocol) if args.protocol else None
    if protocol is None and (not args.method or not args.metric):
        raise InputError("give --method and --metric (repeatable), or a --protocol")
    size = _size(args, protocol)
    resize = args.resize or (protocol.resize if protocol else None)
    targets, metric_targets = _targets(args, protocol)

    methods = ({spec: build_component(spec, "explainer") for spec in args.method} if args.method
               else protocol.explainer_components(progress=False))
    for spec in args.metric or []:
        build_component(spec, "metric")  # check the spec before loading anything

    started = False
    if distributed_env():
        init_distributed(device=args.device)
        started = True
    try:
        device = training_device(args.device)
        model = load_model(args.model, args.weights).to(device)
        mean, std, source = input_normalization(model)
        mean = tuple(args.mean) if args.mean else mean
        std = tuple(args.std) if args.std else std
        metrics = protocol.metrics(size, mean, std) if protocol else {}
        for spec in args.metric or []:
            if spec in metrics:
                raise InputError(f"--metric {spec!r}: the protocol already has a metric of that name")
            metrics[spec] = _build_metric(spec, mean, std)
        dataset = _open_dataset(args, size, resize, mean, std)
        identity = {"protocol": protocol.name if protocol else None, "model_spec": args.model}
        result = evaluate(model, dataset, methods, metrics, targets=targets, metric_targets=metric_targets,
                          out=args.out, batch_size=args.batch_size, workers=args.workers, limit=args.limit,
                          overwrite=args.overwrite, keep_maps=args.grid, resamples=args.bootstrap, seed=args.seed,
                          progress=not args.quiet, identity=identity)
        rank = dist.get_rank() if started else 0
        if rank == 0:
            extra = {
                "model": args.model, "weights": args.weights, "protocol": protocol.name if protocol else None,
                "dataset": args.dataset or "files", "split": args.split, "size": list(size), "resize": resize,
                "mean": list(mean), "std": list(std), "normalization": "--mean/--std" if args.mean else source,
                "target": args.target, "targets": result.config["targets"], "metric_targets": metric_targets,
                "device": str(device),
                "methods": {m: {"name": getattr(e, "registry_name", m), "config": e.config.model_dump(mode="json")}
                            for m, e in methods.items()},
                "seconds_explaining": {e: s["explain"] * result.images for e, s in result.seconds.items()},
            }
            title = f"foveal evaluate-explanations{' --protocol ' + protocol.name if protocol else ''}"
            subtitle = (f"model {args.model}; {args.dataset or 'image files'}"
                        f"{' ' + args.split if args.split else ''}; {result.images} images; targets "
                        f"{', '.join(result.config['targets'])}")
            paths = write_outputs(result, args.out, title=title, subtitle=subtitle, extra=extra, mean=mean, std=std)
            if result.resumed:
                print(f"resumed: {result.resumed} of {result.images} images were already evaluated in {args.out}")
            print(results_markdown(result))
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
    return 0

