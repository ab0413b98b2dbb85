"""Evaluation throughput: ``foveal.evaluation.evaluate`` (DataLoader with workers over JPEG files,
targets, records appended and fsynced per batch, aggregates and bootstrap intervals) against the
bare explain + metric calls it must make, on images already decoded in memory, in the same run.

Per model (random weights, 224 px, resize 256 + centre crop from 375 x 500 JPEGs):

* ``bare``: for each batch, ``explainer.explain`` and every ``metric.compute`` (the forwards and
  backwards the evaluation cannot avoid); the baseline, ratio 1.00;
* ``harness``: ``evaluate(..., out=TMP, workers=W)`` on the same images read from disk;
* ``loader``: the DataLoader alone (decode + resize + normalise with W workers), to show that
  reading images is not what limits the harness;
* ``1 process`` / ``2 processes``: ``evaluate`` under torchrun with 1 and 2 processes (each with
  ``threads / processes`` torch threads on the CPU, or one GPU each where there are two).

The settings are the papers' protocols with fewer insertion/deletion steps so that a CPU run
finishes in minutes: resnet50 with Grad-CAM scored by ``ca-stream-table1`` (AD, AG, AI, I, D;
``--steps`` 8 instead of 28), vit_small with ``vit-lrp`` scored by ``chefer-perturbation`` (positive
and negative perturbation, predicted class explained, label scored).

    python benchmarks/bench_evaluation.py --images 16 --batch-size 4 --workers 2 [--device cuda] [--threads 2]
        [--clock cpu] [--skip-processes]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import CLOCKS, best_of, sync

HERE = Path(__file__).resolve().parent
SETUPS = {
    "resnet50": dict(explainer="grad-cam", protocol="ca-stream-table1", targets="label", metric_targets="label"),
    "vit_small_patch16_224": dict(explainer="vit-lrp:start_layer=1", protocol="chefer-perturbation",
                                  targets="predicted", metric_targets="label"),
}


def write_images(root: Path, n: int) -> Path:
    from foveal.data.fixtures import FIXTURE_SYNSETS, write_imagenet_folders

    classes = [w for w, _ in FIXTURE_SYNSETS[:4]]
    write_imagenet_folders(root / "val", classes=classes, per_class=-(-n // len(classes)), size=(375, 500))
    return root


def build(model_name: str, data: Path, steps: int, device: torch.device, limit: int):
    """Model, dataset, explainer and metrics of one setup."""
    import timm

    from foveal import registry
    from foveal.cli.options import input_normalization, parse_spec
    from foveal.data.datasets import open_dataset
    from foveal.evaluation import get_protocol

    setup = SETUPS[model_name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10).to(device).eval()
    mean, std, _ = input_normalization(model)
    dataset = open_dataset("imagenet", data, "val", size=224, resize="resize-crop", mean=mean, std=std)
    name, opts = parse_spec(setup["explainer"])
    explainer = registry.build(name, **opts)
    metrics = get_protocol(setup["protocol"]).metrics(224, mean, std)
    for m in ("insertion", "deletion"):
        if m in metrics:
            metrics[m] = registry.build(m, **{**metrics[m].config.model_dump(), "steps": steps})
    return model, torch.utils.data.Subset(dataset, range(limit)), dataset, {setup["explainer"]: explainer}, metrics


def bare(model, images, labels, explainer, metrics, batch_size: int, targets: str):
    for lo in range(0, images.shape[0], batch_size):
        x, y = images[lo:lo + batch_size], labels[lo:lo + batch_size]
        maps = explainer.explain(model, x, None if targets == "predicted" else y)
        for metric in metrics.values():
            metric.compute(model, x, maps, y)


def worker(args) -> None:
    """One process of the 1- / 2-process measurement (run under torchrun)."""
    from foveal.core.training import distributed_env, init_distributed, training_device
    from foveal.evaluation import evaluate

    if distributed_env():
        init_distributed(device=args.device)
    device = training_device(args.device)
    torch.set_num_threads(max(1, args.threads // int(os.environ.get("WORLD_SIZE", "1"))))
    model, _, dataset, explainers, metrics = build(args.model, Path(args.data), args.steps, device, args.images)
    setup = SETUPS[args.model]
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    evaluate(model, dataset, explainers, metrics, targets=setup["targets"], metric_targets=setup["metric_targets"],
             out=args.out, batch_size=args.batch_size, workers=args.workers, limit=args.images, overwrite=True,
             progress=False)
    sync(device)
    timing = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    (Path(args.out) / f"timing.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(timing))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def processes(args, n: int, data: Path, out: Path) -> tuple[float, float]:
    """(wall seconds of the slowest process, CPU seconds of all processes) of ``evaluate`` under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
           "--worker", "--model", args.model_name, "--data", str(data), "--out", str(out), "--images",
           str(args.images), "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--steps",
           str(args.steps), "--threads", str(args.threads), *(["--device", args.device] if args.device else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(max(1, args.threads // n))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("timing.rank*.json"))]
    return max(r["seconds"] for r in runs), sum(r["cpu"] for r in runs)


def measure(name: str, args, data: Path, tmp: Path, device: torch.device) -> list[tuple]:
    """The rows of one model (see the module docstring)."""
    from torch.utils.data import DataLoader

    from foveal.data.items import collate
    from foveal.evaluation import evaluate

    args.model_name = name
    setup = SETUPS[name]
    model, subset, dataset, explainers, metrics = build(name, data, args.steps, device, args.images)
    items = [subset[i] for i in range(len(subset))]
    images = torch.stack([it["image"] for it in items]).to(device)
    labels = torch.tensor([it["label"] for it in items], device=device)
    explainer = next(iter(explainers.values()))
    clock = CLOCKS[args.clock]
    t_bare, _ = best_of(lambda: bare(model, images, labels, explainer, metrics, args.batch_size, setup["targets"]),
                        device, args.repeats, clock)

    def harness():
        return evaluate(model, dataset, explainers, metrics, targets=setup["targets"],
                        metric_targets=setup["metric_targets"], out=tmp / f"out-{name}", batch_size=args.batch_size,
                        workers=args.workers, limit=args.images, overwrite=True, progress=False)

    def loader():
        for _ in DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate):
            pass

    t_harness, _ = best_of(harness, device, args.repeats, clock)
    t_loader, _ = best_of(loader, torch.device("cpu"), args.repeats)
    n = args.images
    print(f"{name}: bare {t_bare:.2f} s, harness {t_harness:.2f} s, loader {t_loader:.2f} s", flush=True)
    rows = [(name, "bare explain + metrics", t_bare, n / t_bare, 1.0),
            (name, f"harness ({args.workers} workers)", t_harness, n / t_harness, t_harness / t_bare),
            (name, f"loader alone ({args.workers} workers)", t_loader, n / t_loader, t_loader / t_bare)]
    if not args.skip_processes:
        for k in (1, 2):
            wall, cpu = processes(args, k, data, tmp / f"p{k}-{name}")
            rows += [(name, f"{k} process{'es' if k > 1 else ''}: wall of the slowest", wall, n / wall, wall / t_bare),
                     (name, f"{k} process{'es' if k > 1 else ''}: CPU of all", cpu, n / cpu, cpu / t_bare)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="insertion/deletion steps (the protocol's: 28)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-processes", action="store_true", help="no 1- vs 2-process runs")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="bare vs harness: wall time, or this process's CPU time (steadier on a shared CPU machine; "
                         "the DataLoader workers' decoding is then measured by the 'loader alone' row only)")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", args.images)
        for name in args.models:
            rows += measure(name, args, data, Path(tmp), device)
    print(f"\n{args.images} images, batch {args.batch_size}, {device}, {args.threads} thread(s), insertion/deletion "
          f"steps {args.steps}, {args.clock} clock for bare/harness (loader and processes: wall)")
    print("| model | what | seconds | images/s | / bare |\n|---|---|---:|---:|---:|")
    for name, what, t, ips, ratio in rows:
        print(f"| {name} | {what} | {t:.2f} | {ips:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
