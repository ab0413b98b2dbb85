"""CAM explainers: foveal vs pytorch-grad-cam vs torchcam (and captum for the input-space
baselines) on timm resnet50 (random init), 224 x 224.

Gradient CAMs (batch 8, target layer ``layer4``): time per explanation as a ratio to a bare
forward of the same batch with gradients enabled (the minimum any gradient CAM needs).
Target: <= 1.15x. Score-CAM (batch 1): ratio to C = 2048 masked forwards at the best batch size
(the best of ``--batch-sizes`` by one timed chunk, then all C forwards run in full under
``torch.no_grad`` with the masked images prepared beforehand). Target: <= 1.15x and faster
than both peers. Every method explains the top class.

Issue 16 methods, beside pytorch-grad-cam's implementation in the same run:
HiResCAM, Shapley-CAM, Finer-CAM, Eigen-CAM and KPCA-CAM (batch ``--batch``, ``layer4``) against
the same forward-with-gradients baseline; Ablation-CAM (batch 1, ``--ablation-size``) against C
forwards like Score-CAM; gradient x input, integrated gradients (``--ig-steps``, Riemann right)
and SmoothGrad (``--sg-samples``) beside captum (``InputXGradient``, ``IntegratedGradients``,
``NoiseTunnel(Saliency)``), as a ratio to one forward + backward to the input per evaluated
batch (x steps or samples). captum gets the top classes precomputed; foveal finds them itself.

Timings are the best of ``--repeats`` runs (``--score-repeats`` for Score-CAM). On a shared
machine the load drifts, so each method's runs are interleaved with runs of its baseline and its
ratio uses those paired baseline runs. The four Score-CAM runs (baseline, foveal,
pytorch-grad-cam, torchcam) are interleaved in rounds, the order rotated each round; the table
gives the best and the median of each. ``--clock cpu`` times process CPU time instead of
wall-clock time (steadier on a shared CPU machine; CPU only).

    python benchmarks/bench_cam.py [--repeats 3] [--score-repeats 1] [--skip-score] [--skip-grad]
                                   [--skip-new] [--skip-ablation] [--skip-input]
                                   [--score-size 224] [--ablation-size 224] [--ig-steps 16]
                                   [--sg-samples 16] [--device cuda] [--threads N] [--size 224]
                                   [--batch-sizes 16 32 64] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from timing import CLOCKS, best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--score-repeats", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--score-size", type=int, default=None, help="image size for Score-CAM (default --size)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--skip-score", action="store_true", help="only the gradient CAMs")
    ap.add_argument("--skip-grad", action="store_true", help="no Grad-CAM / ++ / XGrad / Layer-CAM")
    ap.add_argument("--skip-new", action="store_true", help="no HiResCAM / Shapley / Finer / Eigen / KPCA")
    ap.add_argument("--skip-ablation", action="store_true", help="no Ablation-CAM")
    ap.add_argument("--skip-input", action="store_true", help="no gradient x input / IG / SmoothGrad")
    ap.add_argument("--ablation-size", type=int, default=None, help="image size for Ablation-CAM (default --size)")
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--sg-samples", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or process CPU time (CPU device only)")
    args, _ = ap.parse_known_args()  # run_all.py passes every flag to every script
    clock = CLOCKS[args.clock]

    def timed(fn, device, repeats):
        return best_of(fn, device, repeats, clock)

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import timm
    from pytorch_grad_cam import GradCAM as PGradCAM
    from pytorch_grad_cam import GradCAMPlusPlus as PGradCAMpp
    from pytorch_grad_cam import LayerCAM as PLayerCAM
    from pytorch_grad_cam import ScoreCAM as PScoreCAM
    from pytorch_grad_cam import XGradCAM as PXGradCAM
    from torchcam import methods as tc

    from foveal import registry

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=1000).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.clock == "cpu" and device.type != "cpu":
        ap.error("--clock cpu measures host CPU time: use it with --device cpu")
    print(f"timm resnet50 (random init), {args.size}x{args.size}, device {device}, "
          f"threads {torch.get_num_threads()}, {args.clock} clock")

    def bare_forward():
        with torch.enable_grad():
            return model(x)

    def paired(fn, base=bare_forward):
        """Best of ``repeats`` runs of fn and of the baseline, interleaved."""
        t_fn, t_base = float("inf"), float("inf")
        for _ in range(args.repeats):
            t_base = min(t_base, timed(base, device, 1)[0])
            t_fn = min(t_fn, timed(fn, device, 1)[0])
        return t_fn, t_base

    rows = []
    if not (args.skip_grad and args.skip_new):
        timed(bare_forward, device, 1)  # warm-up
        base, _ = timed(bare_forward, device, args.repeats)
        rows.append(("forward with grad (baseline)", f"batch {args.batch}", base, 1.0, "", None, None))

    def pgc(cls, inp):
        def run():
            with cls(model=model, target_layers=[model.layer4]) as cam:
                return cam(input_tensor=inp, targets=None)
        return run

    def torchcam(cls, inp, **kw):
        def run():
            extractor = cls(model, "layer4", **kw)
            try:
                with torch.set_grad_enabled(cls is not tc.ScoreCAM):
                    out = model(inp)
                return extractor(out.argmax(1).tolist(), out)
            finally:
                extractor.remove_hooks()
        return run

    grad_methods = [
        ("grad-cam", PGradCAM, tc.GradCAM), ("grad-cam++", PGradCAMpp, tc.GradCAMpp),
        ("xgrad-cam", PXGradCAM, tc.XGradCAM), ("layer-cam", PLayerCAM, tc.LayerCAM),
    ]
    for name, p_cls, t_cls in [] if args.skip_grad else grad_methods:
        explainer = registry.build(name, target_layer="layer4")
        ours, b0 = paired(lambda e=explainer: e.explain(model, x))
        p, b1 = paired(pgc(p_cls, x))
        t, b2 = paired(torchcam(t_cls, x))
        verdict = "ok" if ours / b0 <= 1.15 else "MISSED (target <= 1.15)"
        rows.append((f"{name}  foveal", f"batch {args.batch}", ours, ours / b0, verdict, None, None))
        rows.append((f"{name}  pytorch-grad-cam", f"batch {args.batch}", p, p / b1, "", None, None))
        rows.append((f"{name}  torchcam", f"batch {args.batch}", t, t / b2, "", None, None))

    if not args.skip_new:
        new_sections(args, model, x, device, registry, paired, rows)

    def masked_forwards(x1, channels, bs=None):
        """The best batch size (by one timed chunk each) and the time of C masked forwards at
        it, run in full like a Score-CAM (one prepared chunk of masked images reused)."""
        size = x1.shape[-1]
        if bs is None:
            per_image = {}
            for b in args.batch_sizes:
                chunk = x1.expand(b, -1, -1, -1) * torch.rand(b, 1, size, size, device=device)
                with torch.no_grad():
                    model(chunk)
                    per_image[b] = timed(lambda c=chunk: model(c), device, args.repeats)[0] / b
            bs = min(per_image, key=per_image.get)
        chunk = x1.expand(bs, -1, -1, -1) * torch.rand(bs, 1, size, size, device=device)

        def run():
            with torch.no_grad():
                for j in range(0, channels, bs):
                    model(chunk[: min(bs, channels - j)])

        return bs, run

    channels = model.layer4[-1].conv3.out_channels
    if not args.skip_score:
        size = args.score_size or args.size
        x1 = torch.randn(1, 3, size, size, device=device)
        best_bs, baseline = masked_forwards(x1, channels)
        ours_e = registry.build("score-cam", target_layer="layer4", batch_size=best_bs, progress=False)
        with torch.no_grad():  # how many masked forwards foveal's exact shortcuts leave
            maps, _, index = ours_e.unique_maps(model.forward_features(x1))
        n_ours = maps.shape[0] + int(bool((index < 0).any()))

        def pgc_score():
            with PScoreCAM(model=model, target_layers=[model.layer4]) as cam:
                cam.batch_size = best_bs
                return cam(input_tensor=x1, targets=None)

        runs = {
            f"{channels} masked forwards (baseline)": baseline,
            "score-cam  foveal": lambda: ours_e.explain(model, x1),
            "score-cam  pytorch-grad-cam": pgc_score,
            "score-cam  torchcam": torchcam(tc.ScoreCAM, x1, batch_size=best_bs, input_shape=tuple(x1.shape[1:])),
        }
        names = list(runs)
        if device.type == "cuda":  # cuDNN autotuning and allocator warm-up stay out of the times
            for fn in runs.values():
                fn()
        times = {k: [] for k in names}
        for r in range(args.score_repeats):  # interleaved rounds, order rotated each round
            for k in names[r % 4:] + names[: r % 4]:
                times[k].append(timed(runs[k], device, 1)[0])
        ref, ref_med = min(times[names[0]]), statistics.median(times[names[0]])
        ours, p, t = (min(times[k]) for k in names[1:])
        verdict = "ok" if ours / ref <= 1.15 and ours < min(p, t) else "MISSED (target <= 1.15, fastest)"
        inputs = [f"{size}px, bs {best_bs}", f"1 img, {n_ours} fwd", f"1 img, {channels} fwd", f"1 img, {channels} fwd"]
        for k, inp, v in zip(names, inputs, ["", verdict, "", ""]):
            best, med = min(times[k]), statistics.median(times[k])
            rows.append((k, inp, best, best / ref, v, med, med / ref_med))
        print(f"Score-CAM: {args.score_repeats} interleaved rounds; best and median of each")

    if not args.skip_ablation:
        ablation_section(args, model, device, registry, masked_forwards, channels, timed, rows)
    if not args.skip_input:
        input_section(args, model, x, device, registry, paired, rows)

    print(f"\n| {'method':<34} | {'input':<18} | {'best (s)':>9} | {'ratio':>6} | {'median (s)':>10} "
          f"| {'ratio':>6} | verdict |")
    print(f"|{'-' * 36}|{'-' * 20}|{'-' * 11}|{'-' * 8}|{'-' * 12}|{'-' * 8}|---------|")
    for name, inp, t, r, v, med, med_r in rows:
        m = f"{med:>10.3f} | {med_r:>6.2f}" if med is not None else f"{'-':>10} | {'-':>6}"
        print(f"| {name:<34} | {inp:<18} | {t:>9.3f} | {r:>6.2f} | {m} | {v} |")


def new_sections(args, model, x, device, registry, paired, rows) -> None:
    """HiResCAM, Shapley-CAM, Finer-CAM, Eigen-CAM, KPCA-CAM: foveal vs pytorch-grad-cam."""
    from pytorch_grad_cam import KPCA_CAM, EigenCAM, FinerCAM, HiResCAM, ShapleyCAM

    def pgc(cls, inp):
        def run():
            with cls(model=model, target_layers=[model.layer4]) as cam:
                return cam(input_tensor=inp, targets=None)
        return run

    for name, cls in [("hirescam", HiResCAM), ("shapley-cam", ShapleyCAM), ("finer-cam", FinerCAM),
                      ("eigen-cam", EigenCAM), ("kpca-cam", KPCA_CAM)]:
        explainer = registry.build(name, target_layer="layer4")
        ours, b0 = paired(lambda e=explainer: e.explain(model, x))
        p, b1 = paired(pgc(cls, x))
        rows.append((f"{name}  foveal", f"batch {args.batch}", ours, ours / b0, "", None, None))
        rows.append((f"{name}  pytorch-grad-cam", f"batch {args.batch}", p, p / b1, "", None, None))


def ablation_section(args, model, device, registry, masked_forwards, channels, timed, rows) -> None:
    """Ablation-CAM, batch 1: foveal vs pytorch-grad-cam, ratio to C forwards (paired rounds)."""
    from pytorch_grad_cam import AblationCAM

    size = args.ablation_size or args.size
    x1 = torch.randn(1, 3, size, size, device=device)
    best_bs, baseline = masked_forwards(x1, channels)
    ours_e = registry.build("ablation-cam", target_layer="layer4", batch_size=best_bs, progress=False)

    def pgc_ablation():
        with AblationCAM(model=model, target_layers=[model.layer4], batch_size=best_bs) as cam:
            return cam(input_tensor=x1, targets=None)

    import contextlib
    import io

    runs = {f"{channels} forwards (baseline)": baseline, "ablation-cam  foveal": lambda: ours_e.explain(model, x1),
            "ablation-cam  pytorch-grad-cam": pgc_ablation}
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(max(1, args.score_repeats)):
        for k in names[r % 3:] + names[: r % 3]:
            with contextlib.redirect_stderr(io.StringIO()):  # pytorch-grad-cam's tqdm bar
                times[k].append(timed(runs[k], device, 1)[0])
    ref = min(times[names[0]])
    for k, inp in zip(names, [f"{size}px, bs {best_bs}", f"1 img, {channels + 1} fwd max", f"1 img, {channels} fwd"]):
        rows.append((k, inp, min(times[k]), min(times[k]) / ref, "", None, None))


def input_section(args, model, x, device, registry, paired, rows) -> None:
    """Gradient x input, integrated gradients, SmoothGrad: foveal vs captum; ratio to one
    forward + backward to the input per evaluated batch."""
    from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    with torch.no_grad():
        top = model(x).argmax(1).tolist()
    b = x.shape[0]

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        return torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xi)[0]

    steps, samples, chunk = args.ig_steps, args.sg_samples, 32
    cases = [
        ("grad-x-input", 1, registry.build("grad-x-input"), lambda: InputXGradient(model).attribute(x, target=top)),
        ("integrated-gradients", steps,
         registry.build("integrated-gradients", steps=steps, batch_size=chunk),
         lambda: IntegratedGradients(model).attribute(x, baselines=0.0, target=top, n_steps=steps,
                                                      method="riemann_right", internal_batch_size=chunk)),
        ("smoothgrad", samples, registry.build("smoothgrad", n_samples=samples, batch_size=chunk),
         lambda: NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=samples, stdevs=0.15,
                                                        target=top, nt_samples_batch_size=max(1, chunk // b))),
    ]
    timed_base = None
    for name, evals, explainer, captum_fn in cases:
        ours, b0 = paired(lambda e=explainer: e.explain(model, x), base=fwd_bwd)
        theirs, b1 = paired(captum_fn, base=fwd_bwd)
        if timed_base is None:
            timed_base = min(b0, b1)
            rows.append(("forward + input backward (baseline)", f"batch {b}", timed_base, 1.0, "", None, None))
        label = f"batch {b}" + (f" x {evals}" if evals > 1 else "")
        rows.append((f"{name}  foveal", label, ours, ours / (evals * b0), "", None, None))
        rows.append((f"{name}  captum", label, theirs, theirs / (evals * b1), "", None, None))


if __name__ == "__main__":
    main()
