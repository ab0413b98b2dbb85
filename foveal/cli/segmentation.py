"""``foveal train``, ``foveal evaluate``, ``foveal predict`` and ``foveal make-synthetic-polyps``.

Distributed training: ``torchrun --nproc_per_node 2 -m foveal train DATA --out runs/x``. An ``--out``
that holds a run needs ``--resume`` (continue) or ``--overwrite`` (start afresh).
"""

from __future__ import annotations

from pathlib import Path

from .options import parse_assignments


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a polyp segmentation model (PraNet/Polyp-PVT protocol)")
    p.add_argument("data", help="dataset root with TrainDataset/ (and TestDataset/ for --eval)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, model.safetensors)")
    p.add_argument("--model", default="rta-former-s", help="registered model (default rta-former-s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="model config override, e.g. --set num_classes=1 --set variant='\"ra\"' (repeatable)")
    p.add_argument("--backbone-weights", help="local backbone weights (official PVTv2 .pth, timm .safetensors)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=("adam", "adamw"), default="adam")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.0, 1.25])
    p.add_argument("--grad-clip", type=float, default=0.5, help="gradient clip (<= 0 disables)")
    p.add_argument("--clip-mode", choices=("value", "norm"), default="value")
    p.add_argument("--lr-decay-epochs", type=int, default=200)
    p.add_argument("--no-augment", action="store_true", help="no random flips")
    p.add_argument("--legacy-loss", action="store_true", help="reference structure loss (unweighted BCE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/last.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in OUT (checkpoints, metrics.jsonl, eval.json) and start afresh")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--eval", action="store_true", help="evaluate on DATA/TestDataset afterwards (OUT/eval.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="meanDice/meanIoU per test dataset (polyp benchmark protocol)")
    p.add_argument("checkpoint", help="model.safetensors or last.safetensors")
    p.add_argument("data", help="root with TestDataset/<name>/{images,masks} (or one dataset folder)")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--datasets", nargs="+", help="only these test datasets")
    p.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write predicted masks and overlays as PNG")
    p.add_argument("checkpoint", help="model.safetensors or last.safetensors")
    p.add_argument("inputs", help="an image or a folder of images")
    p.add_argument("out", help="output folder (masks/ and overlays/)")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("make-synthetic-polyps", help="write a synthetic polyp dataset (benchmark layout)")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=40, help="training images")
    p.add_argument("--test", type=int, default=10, help="images per test set")
    p.add_argument("--test-sets", nargs="+", default=["SynthA", "SynthB"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)


def cmd_train(args) -> int:
    from ..training.segmentation import evaluate, format_table, train, write_json

    options = parse_assignments(args.set)
    if args.backbone_weights:
        options["backbone_weights"] = args.backbone_weights
    result = train(
        data=args.data, out=args.out, model=args.model, model_options=options, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
        size=args.size, scales=args.scales, grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        clip_mode=args.clip_mode, lr_decay_epochs=args.lr_decay_epochs, augment=not args.no_augment,
        legacy_loss=args.legacy_loss, seed=args.seed, num_workers=args.num_workers, resume=args.resume,
        overwrite=args.overwrite, device=args.device, progress=not args.quiet,
    )
    from ..core.training import is_main_process

    if is_main_process():
        print(f"model written to {Path(args.out) / 'model.safetensors'}")
        if args.eval:
            results = evaluate(result["model"], args.data, size=args.size, progress=not args.quiet)
            print(format_table(results))
            print(f"results written to {write_json(results, Path(args.out) / 'eval.json')}")
    return 0


def cmd_evaluate(args) -> int:
    from ..core.tensors import resolve_device
    from ..training.segmentation import evaluate, format_table, load_model, write_json

    model = load_model(args.checkpoint, device=resolve_device(args.device))
    results = evaluate(model, args.data, size=args.size, datasets=args.datasets, progress=not args.quiet)
    print(format_table(results))
    if args.json_path:
        print(f"results written to {write_json(results, args.json_path)}")
    return 0


def cmd_predict(args) -> int:
    from ..core.tensors import resolve_device
    from ..training.segmentation import load_model, predict

    model = load_model(args.checkpoint, device=resolve_device(args.device))
    paths = predict(model, args.inputs, args.out, size=args.size, threshold=args.threshold, progress=not args.quiet)
    print(f"{len(paths)} masks written to {Path(args.out) / 'masks'} (overlays in {Path(args.out) / 'overlays'})")
    return 0


def cmd_make_synthetic(args) -> int:
    from ..data.polyp import make_synthetic_polyps

    out = make_synthetic_polyps(args.out, num_train=args.train, num_test=args.test,
                                test_sets=tuple(args.test_sets), size=args.size, seed=args.seed)
    print(f"synthetic polyp dataset written to {out} ({args.train} train, {args.test} x {len(args.test_sets)} test)")
    return 0
