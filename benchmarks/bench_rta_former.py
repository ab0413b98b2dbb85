"""RTA-Former T/S/M/L cost relative to the bare PVTv2 backbone, measured in the same run.

For each variant and batch size (352x352 by default), in a fresh subprocess (so that the CPU
peak-memory reading, ``ru_maxrss``, belongs to that configuration only):

* ``backbone fwd``: the bare backbone forward (eval, no grad): the baseline;
* ``model fwd``: the full RTA-Former forward (eval, no grad);
* ``train step``: forward + structure loss + backward + Adam step (train mode);
* peak memory above the state after building the model (CPU: resident set size; CUDA: allocator
  peak), for the backbone forward, model forward and train step.

Every time and memory figure is also printed as a ratio to the backbone forward.

    python benchmarks/bench_rta_former.py                       # T and S, batch 1 and 8
    python benchmarks/bench_rta_former.py --variants t s m l --batch-sizes 1 8 --repeats 3
    python benchmarks/bench_rta_former.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(variant: str, batch: int, size: int, repeats: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from foveal import registry
    from foveal.training.segmentation import structure_loss

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = registry.build(f"rta-former-{variant}").to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = (torch.rand(batch, 1, size, size, device=dev) > 0.7).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def peak(fn) -> float:
        """Peak memory (MiB) above the current state while running fn."""
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        fn()
        return _rss_mb() - start_rss  # ru_maxrss only grows: measure in increasing order

    def backbone_fwd():
        with torch.no_grad():
            model.backbone(x)

    def model_fwd():
        with torch.no_grad():
            model(x)

    def train_step():
        loss = structure_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.eval()
    start_rss = _rss_mb()
    mem = {"backbone": peak(backbone_fwd), "model": peak(model_fwd)}
    t_backbone = timed(backbone_fwd)
    t_model = timed(model_fwd)
    model.train()
    mem["train"] = peak(train_step)
    t_train = timed(train_step)
    return {
        "variant": variant, "batch": batch, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "backbone_params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "t_backbone": t_backbone, "t_model": t_model, "t_train": t_train,
        "mem_backbone": mem["backbone"], "mem_model": mem["model"], "mem_train": mem["train"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t", "s"], choices=["t", "s", "m", "l"])
    p.add_argument("--batch-sizes", "--sizes", nargs="+", type=int, default=[1, 8], dest="batch_sizes")
    p.add_argument("--size", type=int, default=352, help="input height and width")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (median), after one warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)  # run_all.py may pass options meant for other scripts

    if args.worker:
        row = worker(args.worker[0], int(args.worker[1]), args.size, args.repeats, args.device, args.threads)
        print("ROW " + json.dumps(row))
        return 0

    rows = []
    for variant in args.variants:
        for batch in args.batch_sizes:
            cmd = [sys.executable, __file__, "--worker", variant, str(batch), "--size", str(args.size),
                   "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            if proc.returncode != 0 or line is None:
                print(f"rta-former-{variant} batch {batch}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[4:]))
            _print_row(rows[-1], header=len(rows) == 1, args=args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if rows else 1


def _print_row(r: dict, *, header: bool, args) -> None:
    if header:
        print(f"RTA-Former at {args.size}x{args.size}, device {args.device}, threads {args.threads}, "
              f"median of {args.repeats} (ratios: / bare backbone forward of the same run)")
        print(f"{'model':<14}{'batch':>6}{'params M':>10}{'bb fwd s':>10}{'fwd s':>9}{'x':>7}{'train s':>9}{'x':>7}"
              f"{'bb MiB':>9}{'fwd MiB':>9}{'x':>6}{'train MiB':>10}{'x':>6}")
    tb, mb = r["t_backbone"], max(r["mem_backbone"], 1e-6)
    print(f"{'rta-former-' + r['variant']:<14}{r['batch']:>6}{r['params_m']:>10.1f}{tb:>10.3f}"
          f"{r['t_model']:>9.3f}{r['t_model'] / tb:>7.2f}{r['t_train']:>9.3f}{r['t_train'] / tb:>7.2f}"
          f"{r['mem_backbone']:>9.0f}{r['mem_model']:>9.0f}{r['mem_model'] / mb:>6.2f}"
          f"{r['mem_train']:>10.0f}{r['mem_train'] / mb:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
