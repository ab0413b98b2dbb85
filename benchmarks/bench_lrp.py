"""Speed of ``lrp`` (relevance to the pixels) on hierarchical transformers, as a ratio to a forward
+ backward of the same model measured in the same run (issue 16; goal: <= 3x).

For each model (timm, random weights, 224 px by default: PVTv2-B2 and Swin-T) and each rule set,
the explainer's ``explain`` is timed against ``fwd+bwd(input)``: the forward and the gradient of
the target logits w.r.t. the input (what a gradient saliency map costs, and what LXT's
Gradient x Input formulation of AttnLRP costs at best). Functions are timed round robin (a slow
patch of a shared machine hits all alike), best of ``--repeats`` with the CPU-time clock on CPU
(steadier on a shared machine) or the wall clock on CUDA.

    .venv/bin/python benchmarks/bench_lrp.py                         # pvt_v2_b2, swin_tiny, batch 1
    .venv/bin/python benchmarks/bench_lrp.py --models pvt_v2_b0 --size 112 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from timing import CLOCKS, sync

RULES = ["attnlrp", "cp-lrp", "chefer", "orig-lrp"]


def bench_model(name: str, args) -> list[str]:
    import timm

    from foveal import registry

    device = torch.device(args.device)
    kw = {"img_size": args.size} if name.startswith("swin") else {}
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kw).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = list(range(args.batch))
    rows = torch.arange(args.batch, device=device)

    def fwd_bwd_input():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out[rows, targets].sum(), xi)

    fns = {"fwd+bwd(input)": fwd_bwd_input}
    for rules in args.rules:
        e = registry.build("lrp", rules=rules)
        fns[f"lrp {rules}"] = lambda e=e: e.explain(model, x, targets)
    clock = CLOCKS["wall" if device.type == "cuda" else args.clock]
    for fn in fns.values():  # warm-up
        fn()
    best = {k: math.inf for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            sync(device)
            t = clock()
            fn()
            sync(device)
            best[k] = min(best[k], clock() - t)
    base = best["fwd+bwd(input)"]
    out = [f"| {name}, {args.size} px, batch {args.batch}, {device.type} | per image (ms) | / fwd+bwd(input) |",
           "|---|---|---|"]
    for k, t in best.items():
        out.append(f"| {k} | {1e3 * t / args.batch:.0f} | {t / base:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pvt_v2_b2", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="CPU clock (ignored on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}, {time.strftime('%Y-%m-%d')}\n")
    for name in args.models:
        print("\n".join(bench_model(name, args)) + "\n")


if __name__ == "__main__":
    main()
