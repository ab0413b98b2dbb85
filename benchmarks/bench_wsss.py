"""The weakly-supervised pipeline at PASCAL VOC sizes (~500 x 375): seeds/s, random-walk time per
image, and memory staying flat as the dataset grows.

1. **Seeds**: the ``seeds`` stage (classifier forward, ``vit-lrp`` per present class, bilinear
   resize to the stored size, float16 ``.npz`` write) on VOC-size JPEGs, against the explainer
   alone on the same inputs already in memory (the baseline): the ratio is the cost of reading,
   resizing and writing. Also the bytes of a seed file.
2. **Random walk** per VOC-size image: AffinityNet's forward, then the walk with the ``psa`` preset
   (beta 8, t 256) and the ``paper`` preset (beta 16, t 8), ``sparse`` vs psa's dense ``squaring``
   (the baseline), on the feature grid of a stride-8 backbone (63 x 47 for 500 x 375).
3. **Memory**: peak resident memory (``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would keep the
   parent's peak across fork and exec) of a fresh process running the seeds, walk and
   evaluation stages over N and 4N images (default 50 and 200; ResNet-18 AffinityNet, same grid); the
   ratio should stay near 1 since no stage holds per-image arrays beyond the image at hand. For scale,
   the in-memory seeds tensor of the former pipeline (N, 20, H, W) float32 is printed beside it.

    .venv/bin/python benchmarks/bench_wsss.py              # defaults: ViT-Ti/16 at 224, resnet50 walk
    .venv/bin/python benchmarks/bench_wsss.py --quick      # 2 images per timing, 10 vs 40 for memory

Random weights everywhere (timing and memory do not depend on them); the images are the VOC
fixture writer's synthetic shapes at 500 x 375 (``foveal.data.fixtures.write_voc``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import CLOCKS, best_of  # noqa: E402

SIZE = (375, 500)


def make_voc(root: Path, n: int) -> None:
    from foveal.data.fixtures import write_voc

    write_voc(root, n_train=n, n_val=0, n_aug=0, size=SIZE, classes=(1, 7, 12, 15), seed=0, max_objects=3)


def pipeline_config(root: Path, out: Path, args) -> dict:
    return dict(out=str(out), dataset="voc", data_root=str(root), split="train", vit=args.vit,
                image_size=args.image_size,
                affinity_options={"backbone_options": {"model_name": args.walk_backbone}, "walk": "sparse"},
                crf_eval=False, progress=False, device=args.device)


def classifier(args, out: Path) -> Path:
    """A randomly initialised 20-class ViT saved as a pipeline classifier file."""
    from foveal.data.voc import VOC_CLASSES
    from foveal.training.multilabel import build_vit, save_classifier

    torch.manual_seed(0)
    model = build_vit(args.vit, 20, args.image_size)
    return save_classifier(model, out / "classifier.safetensors",
                           {"vit": args.vit, "vit_kwargs": {}, "classes": list(VOC_CLASSES[1:]),
                            "image_size": args.image_size, "mean": [0.5] * 3, "std": [0.5] * 3})


def bench_seeds(args, root: Path, work: Path) -> list[str]:
    from foveal.pipelines import wsss
    from foveal.refine.store import SeedStore

    cfg = wsss.WSSSConfig(**pipeline_config(root, work / "seeds_run", args), classifier=str(classifier(args, work)))
    images = wsss.dataset_set(cfg, "train")
    model, info = wsss.load_classifier(cfg.classifier, classes=images.classes)
    device = torch.device(args.device)
    model = model.to(device)
    explainer = wsss.explainer_for(cfg)
    n = args.seed_images
    subset = wsss.ImageSet(images.ids[:n], images.classes, images.item, "subset", True)
    loaded = [subset.load(i) for i in range(n)]
    inputs = [(wsss.to_tensor(wsss.resize_rgb(rgb, args.image_size), info["mean"], info["std"])[None].to(device),
               torch.nonzero(labels > 0.5)[:, 0].tolist()) for _, rgb, labels in loaded]
    classes = sum(len(p) for _, p in inputs)

    def explain_only():
        for x, present in inputs:
            explainer.explain(model, x.expand(len(present), -1, -1, -1), present)

    def stage():
        store = SeedStore(work / f"seeds_{time.perf_counter_ns()}")
        wsss.seeds_stage(cfg, model, info, [subset], store, 0, 1, device)
        return store

    base, _ = best_of(explain_only, device, args.repeats, CLOCKS[args.clock])
    full, store = best_of(stage, device, args.repeats, CLOCKS[args.clock])
    size = np.mean([store.path(i).stat().st_size for i in subset.ids]) / 2**20
    return [
        f"| seeds, {args.vit} at {args.image_size} px, {n} images ({classes} present classes), {args.device} "
        "| s / image | images / s | ratio |",
        "|---|---|---|---|",
        f"| explainer only (inputs in memory) | {base / n:.3f} | {n / base:.2f} | 1.00 |",
        f"| seeds stage (read, explain, resize to 500x375, write float16) | {full / n:.3f} | {n / full:.2f} | "
        f"{full / base:.2f} |",
        "",
        f"seed file: {size:.2f} MiB per image on average ({classes / n:.1f} classes x 375 x 500 float16)",
    ]


def bench_walk(args, root: Path, work: Path) -> list[str]:
    from foveal import registry
    from foveal.data.images import to_tensor
    from foveal.pipelines import wsss
    from foveal.refine.random_walk import WALK_PRESETS, random_walk
    from foveal.refine.seeds import background_scores

    device = torch.device(args.device)
    torch.manual_seed(0)
    refiner = registry.build("affinitynet", backbone_options={"model_name": args.walk_backbone}).to(device).eval()
    images = wsss.dataset_set(wsss.WSSSConfig(**pipeline_config(root, work / "w", args)), "train")
    rows = []
    times: dict[str, list[float]] = {}
    grid = None
    for i in range(args.walk_images):
        _, rgb, labels = images.load(i)
        x = to_tensor(rgb, refiner.config.mean, refiner.config.std)[None].to(device)
        k = int((labels > 0).sum())
        seeds = torch.rand(1, k, *rgb.shape[:2], device=device) ** 2
        t, aff = best_of(lambda x=x: refiner(x), device, args.repeats, CLOCKS[args.clock])
        times.setdefault("forward", []).append(t)
        grid = tuple(aff.shape[-2:])
        scores = torch.nn.functional.interpolate(background_scores(seeds, 16), size=grid, mode="area")
        for preset, values in WALK_PRESETS.items():
            for method in ("squaring", "sparse"):
                t, _ = best_of(lambda m=method, v=values, s=scores, a=aff: random_walk(
                    a, s, beta=v["beta"], steps=v["steps"], method=m), device, args.repeats, CLOCKS[args.clock])
                times.setdefault(f"{preset} {method}", []).append(t)
    rows.append(f"| random walk per image, 500x375 -> grid {grid[0]}x{grid[1]}, {args.walk_backbone}, {args.device} "
                "| s / image | / dense (same preset) |")
    rows.append("|---|---|---|")
    rows.append(f"| AffinityNet forward | {np.mean(times['forward']):.3f} | |")
    for preset, values in WALK_PRESETS.items():
        dense = np.mean(times[f"{preset} squaring"])
        for method in ("squaring", "sparse"):
            t = np.mean(times[f"{preset} {method}"])
            rows.append(f"| walk {preset} (beta {values['beta']}, t {values['steps']}), {method} | {t:.3f} | "
                        f"{t / dense:.3f} |")
    return rows


def peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (Linux; not inherited from the parent), else
    ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(args_json: str, root: str, n: int, queue) -> None:
    args = argparse.Namespace(**json.loads(args_json))
    torch.set_num_threads(args.threads)
    from foveal.pipelines import wsss
    from foveal.refine.store import SeedStore

    work = Path(tempfile.mkdtemp())
    args.walk_backbone = args.memory_backbone
    cfg = wsss.WSSSConfig(**pipeline_config(Path(root), work / "run", args), classifier=str(classifier(args, work)))
    images = wsss.dataset_set(cfg, "train")
    images = wsss.ImageSet(images.ids[:n], images.classes, images.item, "subset", True)
    model, info = wsss.load_classifier(cfg.classifier, classes=images.classes)
    store, masks = SeedStore(work / "seeds"), work / "masks"
    device = torch.device(args.device)
    t0 = time.perf_counter()
    wsss.seeds_stage(cfg, model, info, [images], store, 0, 1, device)
    torch.manual_seed(0)
    refiner = wsss.build_refiner(cfg)
    wsss.walk_stage(cfg, refiner, images, store, masks, False, 0, 1, device)
    wsss.eval_stage(images, store, masks, False, False)
    queue.put((peak_rss_mib(), time.perf_counter() - t0))


def bench_memory(args, root: Path) -> list[str]:
    ctx = mp.get_context("spawn")
    rows = [f"| seeds + walk + eval stages, 500x375, {args.vit} / {args.memory_backbone}, fresh process | images "
            "| peak RSS (MiB) | / smallest | seconds | former in-memory seeds tensor (MiB) |",
            "|---|---|---|---|---|---|"]
    first = None
    for n in (args.memory_small, args.memory_large):
        queue = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=(json.dumps(vars(args)), str(root), n, queue))
        p.start()
        rss, seconds = queue.get()
        p.join()
        first = first or rss
        dense = n * 20 * SIZE[0] * SIZE[1] * 4 / 2**20
        rows.append(f"| | {n} | {rss:.0f} | {rss / first:.2f} | {seconds:.0f} | {dense:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vit", default="vit_tiny_patch16_224", help="timm ViT of the classifier (random weights)")
    parser.add_argument("--image-size", type=int, default=224, help="classifier input side (paper: 448)")
    parser.add_argument("--walk-backbone", default="resnet50", help="timm CNN of AffinityNet (stride-8 grid)")
    parser.add_argument("--memory-backbone", default="resnet18", help="AffinityNet CNN of the memory runs")
    parser.add_argument("--seed-images", type=int, default=8)
    parser.add_argument("--walk-images", type=int, default=3)
    parser.add_argument("--memory-small", type=int, default=50)
    parser.add_argument("--memory-large", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="cpu: this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("seeds", "walk", "memory"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a shared 2-core machine oversubscribed by 2 threads runs 10x slower)")
    parser.add_argument("--quick", action="store_true", help="2 images per timing, memory at 10 and 40 images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seed_images, args.walk_images, args.memory_small, args.memory_large, args.repeats = 2, 1, 10, 40, 1
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, device {args.device}, {args.clock} clock\n")
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp) / "voc", Path(tmp) / "work"
        work.mkdir()
        t0 = time.perf_counter()
        make_voc(root, args.memory_large)
        print(f"(wrote {args.memory_large} VOC-size images in {time.perf_counter() - t0:.0f} s)\n")
        for name, fn in (("seeds", lambda: bench_seeds(args, root, work)),
                         ("walk", lambda: bench_walk(args, root, work)),
                         ("memory", lambda: bench_memory(args, root))):
            if name not in args.skip:
                print("\n".join(fn()) + "\n", flush=True)


if __name__ == "__main__":
    main()
