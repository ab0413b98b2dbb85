"""Inference cost and parameter overhead of CA-Stream vs GAP (ca-stream.txt, section 3.3).

Same timm ResNet-50 (random init, eval mode, no grad), batch 8 at 224 x 224: the GAP classifier
(timm's own forward) against the same network with CA-Stream (five blocks, and the single-block
variant). Variants are timed interleaved in one run and each reports the best of ``--reps``
(contention on a shared machine only adds time, so the minimum is the stable statistic), which
keeps the ratios to GAP comparable even on a busy machine. The stream alone (pooling on precomputed stage features)
is timed too.

    python benchmarks/bench_ca_stream.py [--model resnet50] [--batch 8] [--size 224] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from foveal import registry
from foveal.models.ca_stream import wrap_classifier


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    gap = registry.build("gap-classifier", model_name=args.model).to(device).eval()
    models = {"GAP": gap, "CA-Stream": wrap_classifier(gap), "CA-Stream (single block)": wrap_classifier(
        gap, single_block=True)}
    for m in models.values():
        m.to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    # the stream alone, on the stage features of this batch
    feats: dict[int, torch.Tensor] = {}
    ca = models["CA-Stream"]
    hooks = [ca.net.get_submodule(n).register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o))
             for k, n in enumerate(ca.tap_modules)]
    with torch.no_grad():
        ca.net.forward_features(x)
    for h in hooks:
        h.remove()
    stage_feats = [feats[k] for k in range(len(ca.tap_modules))]
    last = stage_feats[-1]

    jobs = {name: (lambda m=m: m(x)) for name, m in models.items()}
    jobs["stream only (5 blocks)"] = lambda: ca.pool(stage_feats)
    jobs["GAP only"] = lambda: last.mean((2, 3))
    times: dict[str, list[float]] = {k: [] for k in jobs}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in jobs.values():
                fn()
        for _ in range(args.reps):
            for name, fn in jobs.items():
                times[name].append(timed(fn, sync))

    base_params = sum(p.numel() for p in gap.parameters())
    base_time = min(times["GAP"])
    rows = []
    for name, ts in times.items():
        med = min(ts)
        model = models.get(name)
        extra = (sum(p.numel() for p in model.parameters()) - base_params) if model is not None else None
        rows.append({"variant": name, "ms": 1000 * med, "ratio": med / base_time, "extra_params": extra,
                     "extra_pct": None if extra is None else 100 * extra / base_params})
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {dev}, torch {torch.__version__}, "
          f"best of {args.reps}; GAP model {base_params / 1e6:.2f} M parameters\n")
    print("| Variant | Time (ms) | Ratio to GAP model | Extra parameters | Parameter overhead |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        extra = "" if r["extra_params"] is None else f"{r['extra_params'] / 1e6:.3f} M"
        pct = "" if r["extra_pct"] is None else f"{r['extra_pct']:.1f} %"
        print(f"| {r['variant']} | {r['ms']:.2f} | {r['ratio']:.3f} | {extra} | {pct} |")
    return rows


if __name__ == "__main__":
    main()
