"""``foveal train-classifier DATA --out DIR`` and ``foveal make-synthetic-classes OUT``."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train-classifier",
        help="train CA-Stream on a frozen classifier (or a GAP classifier) on an image-folder dataset",
        description="Image-folder dataset: DATA/<class>/* or DATA/{train,val}/<class>/*. With --pooling ca-stream "
        "only the stream learns (backbone, BN statistics and classifier frozen); start from a trained GAP model "
        "with --init (foveal checkpoint) or --weights (timm weights file). With --pooling gap every parameter "
        "trains. Writes OUT/model.safetensors, OUT/last.safetensors and OUT/log.jsonl; an OUT that holds a run "
        "needs --resume (continue it) or --overwrite (start afresh).",
    )
    p.add_argument("data", help="dataset root")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pooling", choices=("gap", "ca-stream"), default="ca-stream")
    p.add_argument("--train-mode", choices=("stream", "full"), default=None,
                   help="default: stream for ca-stream, full for gap")
    p.add_argument("--model", default="resnet50", help="timm classifier name (default resnet50)")
    p.add_argument("--init", default=None, help="foveal checkpoint of a gap- or ca-stream-classifier to start from")
    p.add_argument("--weights", default=None, help="local timm weights file of the classifier")
    p.add_argument("--num-classes", type=int, default=None, help="default: number of class folders")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--single-block", action="store_true", help="one CA block after the last stage")
    p.add_argument("--qk-proj", action="store_true", help="query/key projections in the CA blocks")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-step", type=int, default=30, help="epochs between lr x lr-gamma steps")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/last.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in OUT (checkpoints, log.jsonl) and start afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("make-synthetic-classes",
                       help="write a small synthetic shapes/textures classification set as image folders")
    p.add_argument("out", help="output folder (OUT/{train,val}/<class>/*.png)")
    p.add_argument("--classes", type=int, default=4, help="number of classes (2-8)")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic_classes)


def cmd_train_classifier(args) -> int:
    from ..training.classification import train_classifier

    result = train_classifier(
        data=args.data, out=args.out, pooling=args.pooling, train_mode=args.train_mode, model_name=args.model,
        init=args.init, weights=args.weights, num_classes=args.num_classes, heads=args.heads,
        single_block=args.single_block, qk_proj=args.qk_proj, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, lr_step=args.lr_step,
        lr_gamma=args.lr_gamma, image_size=args.image_size, crop_scale=tuple(args.crop_scale),
        workers=args.workers, seed=args.seed, device=args.device, resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    if result["history"]:
        print(json.dumps(result["history"][-1]))
        print(f"model: {result['model_path']}")
    return 0


def cmd_make_synthetic_classes(args) -> int:
    from ..data.classification import make_synthetic_classes

    out = make_synthetic_classes(args.out, num_classes=args.classes, train_per_class=args.train_per_class,
                                 val_per_class=args.val_per_class, size=args.size, seed=args.seed, progress=True)
    print(f"wrote {out}/train and {out}/val")
    return 0
