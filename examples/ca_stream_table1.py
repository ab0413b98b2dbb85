"""Reproduce the shape of Table 1 of CA-Stream (ca-stream.txt, section 4): accuracy, and for
GAP and CA pooling, Grad-CAM, Grad-CAM++ and Score-CAM scored with average drop (AD), average
gain (AG), average increase (AI), insertion (I) and deletion (D).

On your data and models (any class-per-folder dataset; ``DATA/val`` is used when it exists):

    python examples/ca_stream_table1.py --data DATA --ca ca.safetensors [--gap gap.safetensors] --out OUT

``--ca`` is a ``ca-stream-classifier`` checkpoint (``foveal train-classifier --pooling ca-stream``);
the GAP baseline defaults to the same frozen network with its own GAP (the model CA-Stream was
trained on), or give ``--gap``. CPU demo on a synthetic set, training a tiny ResNet from scratch
with GAP and then CA-Stream on it (what CI runs):

    python examples/ca_stream_table1.py --synthetic --out OUT

Writes ``OUT/table1.md``, ``OUT/table1.json`` and ``OUT/figure.png`` (saliency maps of both
poolings and the CA raw attention, like Figure 2). Scores follow the authors' evaluation code (the
``ca-stream-table1`` protocol of ``foveal.evaluation``): the ground-truth class is explained and
scored; AD/AG/AI in percent on the soft map over a black image (pixel space); I/D are areas under
the probability curve, 8 image rows per step, reported x100 as in the paper.
"""

from __future__ import annotations

import argparse
import sys

from foveal.pipelines.pooling_study import METHODS, run_table1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="image-folder dataset (DATA/val/<class>/* or DATA/<class>/*)")
    p.add_argument("--ca", help="ca-stream-classifier checkpoint")
    p.add_argument("--gap", help="gap-classifier checkpoint (default: the CA model's own network with GAP)")
    p.add_argument("--synthetic", action="store_true", help="demo: synthetic data + tiny ResNet trained here")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None,
                   help="insertion/deletion steps (default: the authors' 8 image rows per step, 28 at 224 px)")
    p.add_argument("--figure-images", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.synthetic and not (args.data and args.ca):
        p.error("give --data and --ca (and optionally --gap), or --synthetic")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run_table1(args.out, data=args.data, ca=args.ca, gap=args.gap, synthetic=args.synthetic,
                         methods=args.methods, limit=args.limit, batch_size=args.batch_size,
                         image_size=args.image_size, steps=args.steps, figure_images=args.figure_images,
                         device=args.device, seed=args.seed, progress=not args.quiet)
    results.pop("figure", None)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
