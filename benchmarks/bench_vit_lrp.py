"""Speed of the ViT explainers and memory/speed of the AffinityNet random walk.

1. ``vit-lrp`` (and the baselines) time per image on a timm ViT, as a ratio to a forward +
   backward of the same ViT measured in the same run: ``fwd+bwd(input)`` is the forward and the
   gradient of the target logit w.r.t. the input (what a gradient saliency method costs);
   ``fwd+bwd(params)`` is the forward and ``score.backward()`` into every parameter (a training
   step without the update). Target: vit-lrp <= 3x.
2. Random walk ``vec(M) T^t`` (beta 8, t 256, 21 classes as in VOC) on a 56x56 and a 112x112
   feature map (psa's grid for 448 px images is 56x56): ``squaring`` (dense T, 8 squarings, psa)
   and ``sparse`` (256 sparse products). Each configuration runs in a fresh process; memory is
   the peak resident-set growth (CPU) or the peak allocated CUDA memory. A dense run beyond
   ``--dense-limit`` times one squaring and multiplies by log2(t) (marked "est.").

    .venv/bin/python benchmarks/bench_vit_lrp.py                 # ViT-B/16 at 224, batch 2
    .venv/bin/python benchmarks/bench_vit_lrp.py --model vit_tiny_patch16_224 --batch 8
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import platform
import time

import torch

EXPLAINERS = ["vit-lrp", "partial-lrp", "attention-rollout", "vit-raw-attention", "attn-grad-cam"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_best(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds that run every function once (round
    robin, so a slow patch of a shared machine hits all of them alike)."""
    for fn in fns.values():  # warm-up
        fn()
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench_explainers(args) -> list[str]:
    import timm

    from foveal import registry

    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False, num_classes=1000).eval().to(device)
    size = model.patch_embed.img_size
    x = torch.randn(args.batch, 3, *size, device=device)
    targets = list(range(args.batch))

    def fwd_bwd_input():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out[torch.arange(len(targets)), targets].sum(), xi)

    def fwd_bwd_params():
        out = model(x)
        out[torch.arange(len(targets)), targets].sum().backward()
        model.zero_grad(set_to_none=True)

    fns = {"fwd+bwd(input)": fwd_bwd_input, "fwd+bwd(params)": fwd_bwd_params}
    for name in EXPLAINERS:
        e = registry.build(name)
        fns[name] = lambda e=e: e.explain(model, x, targets)
    best = interleaved_best(fns, args.repeats)
    base_in, base_p = best["fwd+bwd(input)"], best["fwd+bwd(params)"]
    rows = [f"| {args.model}, batch {args.batch}, {device.type} | per image (ms) | / fwd+bwd(input) "
            "| / fwd+bwd(params) |", "|---|---|---|---|"]
    for name, t in best.items():
        rows.append(f"| {name} | {1e3 * t / args.batch:.1f} | {t / base_in:.2f} | {t / base_p:.2f} |")
    return rows


def _rss_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (Linux), MiB. ``ru_maxrss`` is not used: it
    survives exec, so a spawned child would inherit the parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _walk_job(side: int, method: str, classes: int, steps: int, device: str, estimate: bool, queue) -> None:
    from foveal.refine.pairs import pair_offsets
    from foveal.refine.random_walk import random_walk, transition_pairs

    torch.manual_seed(0)
    dev = torch.device(device)
    aff = torch.rand(1, len(pair_offsets(5)), side, side, device=dev)
    scores = torch.rand(1, classes, side, side, device=dev)
    try:  # reset the peak to the current resident size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0 = _rss_mib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if estimate:  # one dense squaring, scaled to log2(steps) squarings
        n = side * side
        rows, cols, vals = transition_pairs(aff[0], 8, 5)
        t = torch.zeros(n, n, device=dev)
        t[rows, cols] = vals
        t0 = time.perf_counter()
        t = t @ t
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) * math.log2(steps)
    else:
        random_walk(aff, scores, beta=8, steps=steps, radius=5, method=method)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = _rss_mib("VmHWM") - rss0
    queue.put((seconds, mem))


def bench_walk(args) -> list[str]:
    ctx = mp.get_context("spawn")
    rows = [f"| random walk ({args.classes} classes, beta 8, t {args.steps}, {args.device}) | n = h*w | time (s) "
            "| peak memory (MiB) |", "|---|---|---|---|"]
    for side in (56, 112):
        for method in ("squaring", "sparse"):
            estimate = method == "squaring" and side > args.dense_limit
            q = ctx.Queue()
            p = ctx.Process(target=_walk_job, args=(side, method, args.classes, args.steps, args.device, estimate, q))
            p.start()
            seconds, mem = q.get()
            p.join()
            tag = " (est.: 1 squaring x 8)" if estimate else ""
            rows.append(f"| {side}x{side} {method}{tag} | {side * side} | {seconds:.2f} | {mem:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--dense-limit", type=int, default=56 if not torch.cuda.is_available() else 112,
                        help="largest side for a full dense squaring run")
    parser.add_argument("--skip-walk", action="store_true")
    parser.add_argument("--skip-explainers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}\n")
    if not args.skip_explainers:
        print("\n".join(bench_explainers(args)) + "\n")
    if not args.skip_walk:
        print("\n".join(bench_walk(args)))


if __name__ == "__main__":
    main()
