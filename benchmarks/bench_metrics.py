"""Faithfulness-metric cost against the forwards each metric must make, beside the other libraries.

Insertion / deletion (``--metric curves``): foveal vs torchcam's DeletionInsertionMetric on timm
resnet50 224x224.

Each curve with N steps must forward N perturbed copies of every image (plus the unmodified
image once). The baseline measured in the same run is exactly those forwards, batched
(``batch_size`` images per forward, under ``torch.inference_mode``), with the perturbed images
prepared beforehand; each method's time is reported as a ratio to it (1.0 = no overhead
beyond the forwards). Both libraries score the same fixed maps (torchcam through a CAM
extractor that returns them), use the zero baseline for both curves and the same batch size;
the AUCs are printed to show that they agree.

    python benchmarks/bench_metrics.py --steps 16 --images 2 [--device cuda] [--threads 2]

ROAD (``--metric road``): foveal vs pytorch-grad-cam's ``ROADMostRelevantFirstAverage`` and
Quantus' ``ROAD``, MoRF over the removed fractions 0.1, ..., 0.9, on the same single-channel
images and maps (Quantus 0.6 runs ROAD on single-channel images only) of a randomly initialised
timm model with ``in_chans=1``. The baseline is the P forwards per image of prepared inputs,
batched like the metric; foveal runs twice, configured like each library (pytorch-grad-cam:
percentile threshold, probability difference; Quantus: rank, accuracy). The imputations alone
(one sparse solve per image and fraction in every library) are timed too.

    python benchmarks/bench_metrics.py --metric road --images 2 --threads 1 --clock cpu
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
    ap.add_argument("--metric", choices=("curves", "road", "all"), default="all")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.metric in ("curves", "all"):
        bench_curves(args)
    if args.metric in ("road", "all"):
        bench_road(args)


def bench_curves(args) -> None:
    clock = CLOCKS[args.clock]
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


ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def bench_road(args) -> None:
    import warnings

    import numpy as np
    import quantus
    import timm
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation

    from foveal import registry
    from foveal.metrics.explanation import noisy_linear_imputation

    clock = CLOCKS[args.clock]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, in_chans=1).to(device).eval()
    b, s, p = args.images, args.size, len(ROAD_FRACTIONS)
    x = torch.randn(b, 1, s, s, device=device)
    # a smooth map (removed regions are blobs, as with real explanations) with distinct values
    maps = torch.nn.functional.interpolate(torch.rand(b, 1, 7, 7), size=(s, s), mode="bicubic",
                                           align_corners=False)[:, 0] + 1e-4 * torch.rand(b, s, s)
    maps = ((maps - maps.amin((1, 2), keepdim=True)) / (maps.amax((1, 2), keepdim=True)
                                                       - maps.amin((1, 2), keepdim=True))).to(device)
    cats = model(x).argmax(1)

    def forwards():
        """The P perturbed forwards per image the metric must make (inputs prepared), batched alike."""
        inputs = x.repeat_interleave(p, 0)
        with torch.inference_mode():
            for lo in range(0, inputs.shape[0], args.batch_size):
                model(inputs[lo : lo + args.batch_size])

    like_pgc = registry.build("road", selection="threshold", difference=True, score="probability",
                              batch_size=args.batch_size)
    like_quantus = registry.build("road", batch_size=args.batch_size)

    def pgc():
        return ROADMostRelevantFirstAverage([round(100 * (1 - f)) for f in ROAD_FRACTIONS])(
            x, maps.cpu().numpy(), [ClassifierOutputSoftmaxTarget(int(c)) for c in cats], model)

    def quantus_road():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantus.ROAD(percentages=[round(100 * f) for f in ROAD_FRACTIONS], disable_warnings=True)(
                model=model, x_batch=x.cpu().numpy(), y_batch=cats.cpu().numpy(), a_batch=maps[:, None].cpu().numpy(),
                device=str(device), batch_size=args.batch_size)

    # the imputations alone: every (image, fraction) removal set of foveal's rank selection
    ranks = torch.sort(maps.flatten(1).cpu(), dim=1, descending=True, stable=True).indices
    masks = []
    for i in range(b):
        for f in ROAD_FRACTIONS:
            removed = torch.zeros(s * s, dtype=torch.bool)
            removed[ranks[i, : int(f * s * s + 1e-9)]] = True
            masks.append((x[i].cpu(), removed.view(s, s)))

    def impute_foveal():
        for img, removed in masks:
            noisy_linear_imputation(img, removed)

    def impute_pgc():
        for img, removed in masks:
            NoisyLinearImputer()(img, (~removed).float())

    def impute_quantus():
        for img, removed in masks:
            quantus_imputation(img.numpy(), np.flatnonzero(removed.numpy().ravel()))

    forwards()  # warm-up
    t_fw, _ = best_of(forwards, device, args.repeats, clock)
    t_pgc_like, v_pgc_like = best_of(lambda: like_pgc(model, x, maps), device, args.repeats, clock)
    t_pgc, v_pgc = best_of(pgc, device, args.repeats, clock)
    t_q_like, v_q_like = best_of(lambda: like_quantus.curve(model, x, maps)[1], device, args.repeats, clock)
    t_q, v_q = best_of(quantus_road, device, args.repeats, clock)
    t_if, _ = best_of(impute_foveal, device, args.repeats, clock)
    t_ip, _ = best_of(impute_pgc, device, args.repeats, clock)
    t_iq, _ = best_of(impute_quantus, device, args.repeats, clock)
    rows = [
        ("P forwards per image (baseline)", t_fw, "-"),
        ("foveal road, configured like pytorch-grad-cam", t_pgc_like, f"{float(v_pgc_like.mean()):.5f}"),
        ("pytorch-grad-cam ROADMostRelevantFirstAverage", t_pgc, f"{float(np.mean(v_pgc)):.5f}"),
        ("foveal road, configured like Quantus (default)", t_q_like,
         " ".join(f"{float(v):.2f}" for v in v_q_like.double().mean(0))),
        ("Quantus ROAD", t_q, " ".join(f"{float(v):.2f}" for v in v_q.values())),
        ("imputations only: foveal", t_if, "-"),
        ("imputations only: pytorch-grad-cam", t_ip, "-"),
        ("imputations only: Quantus", t_iq, "-"),
    ]
    print(f"\nROAD MoRF, {args.model} (in_chans=1) {s}x{s}, {b} images, P = {p} fractions, batch {args.batch_size}, "
          f"device {device}{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"{args.clock} clock, best of {args.repeats}\n")
    print("| run | seconds | ratio to the P forwards per image | value (mean; per fraction for accuracy) |")
    print("|---|---:|---:|---|")
    for name, t, value in rows:
        print(f"| {name} | {t:.3f} | {t / t_fw:.2f} | {value} |")


if __name__ == "__main__":
    main()
