"""Insertion / deletion cost: foveal vs torchcam's DeletionInsertionMetric on timm resnet50 224x224.

Each curve with N steps must forward N perturbed copies of every image (plus the unmodified
image once). The baseline measured in the same run is exactly those forwards, batched
(``batch_size`` images per forward, under ``torch.inference_mode``), with the perturbed images
prepared beforehand; each method's time is reported as a ratio to it (1.0 = no overhead
beyond the forwards). Both libraries score the same fixed maps (torchcam through a CAM
extractor that returns them), use the zero baseline for both curves and the same batch size;
the AUCs are printed to show that they agree.

    python benchmarks/bench_metrics.py --steps 16 --images 2 [--device cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from functools import partial

import torch
from timing import CLOCKS, best_of


class FixedCAM:
    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, *, targets=None, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="'cpu': this process's CPU time (steadier on a shared CPU machine with --threads 1)")
    args = ap.parse_args()
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm
    from torchcam.metrics import DeletionInsertionMetric

    from foveal import registry

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).to(device).eval()
    b, n, s = args.images, args.steps, args.size
    x = torch.randn(b, 3, s, s, device=device)
    maps = torch.rand(b, s, s, device=device)
    lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    maps = (maps - lo) / (hi - lo)

    def forwards(count):
        """``count`` forwards per image of pre-built inputs, batched like the metrics."""
        inputs = x.repeat_interleave(count, 0)
        with torch.inference_mode():
            for lo in range(0, inputs.shape[0], args.batch_size):
                model(inputs[lo : lo + args.batch_size])

    dele = registry.build("deletion", steps=n, baseline="zero", x_axis="fraction", batch_size=args.batch_size)
    ins = registry.build("insertion", steps=n, baseline="zero", x_axis="fraction", batch_size=args.batch_size)
    ins_blur = registry.build("insertion", steps=n, batch_size=args.batch_size)

    def torchcam_both():
        m = DeletionInsertionMetric(FixedCAM(model, maps), partial(torch.softmax, dim=-1), steps=n,
                                    batch_size=args.batch_size)
        m.update(x)
        return m.summary()

    forwards(1)  # warm-up
    t_n, _ = best_of(lambda: forwards(n), device, args.repeats, clock)
    t_2n, _ = best_of(lambda: forwards(2 * n), device, args.repeats, clock)
    t_del, v_del = best_of(lambda: dele(model, x, maps), device, args.repeats, clock)
    t_ins, v_ins = best_of(lambda: ins(model, x, maps), device, args.repeats, clock)
    t_blur, _ = best_of(lambda: ins_blur(model, x, maps), device, args.repeats, clock)
    t_tc, v_tc = best_of(torchcam_both, device, args.repeats, clock)

    rows = [
        ("N forwards per image (baseline)", t_n, t_n, "-"),
        ("foveal deletion", t_del, t_n, f"{float(v_del.mean()):.6f}"),
        ("foveal insertion (zero baseline)", t_ins, t_n, f"{float(v_ins.mean()):.6f}"),
        ("foveal insertion (RISE blur, default)", t_blur, t_n, "-"),
        ("2N forwards per image (baseline)", t_2n, t_2n, "-"),
        ("foveal deletion + insertion", t_del + t_ins, t_2n, "-"),
        ("torchcam DeletionInsertionMetric (both)", t_tc, t_2n,
         f"del {v_tc['deletion_auc']:.6f} / ins {v_tc['insertion_auc']:.6f}"),
    ]
    print(f"\n{args.model} {s}x{s}, {b} images, N = {n} steps, batch {args.batch_size}, device {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, {args.clock} clock, "
          f"best of {args.repeats}\n")
    print("| run | seconds | ratio to the forwards it must make | mean AUC |")
    print("|---|---:|---:|---|")
    for name, t, base, auc in rows:
        print(f"| {name} | {t:.3f} | {t / base:.2f} | {auc} |")


if __name__ == "__main__":
    main()
