"""``foveal demo``: run what foveal offers on built-in data (no downloads)."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on built-in synthetic data")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output/)")
    p.add_argument("--data", default=None, help="a dataset in the standard polyp layout instead of synthetic data")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..pipelines.demo import run_demo

    run_demo(out=args.out, data=args.data, quick=args.quick, seed=args.seed)
    return 0
