"""Dense CRF (Kraehenbuehl & Koltun 2011) with the psa parameters; needs the optional
``pydensecrf2`` package (``pip install 'foveal[crf]'``)."""

from __future__ import annotations

import numpy as np

from ..core.errors import FovealError

#: psa ``crf_inference``: iterations, Gaussian (sxy, compat), bilateral (sxy, srgb, compat)
CRF_PARAMS = {"iterations": 10, "gaussian": (3, 3), "bilateral": (80, 13, 10)}


def dense_crf(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Dense-CRF marginals (C, H, W) of ``scores`` (C, H, W) on a uint8 RGB image (H, W, 3), with
    the psa parameters :data:`CRF_PARAMS`. Needs the optional ``pydensecrf2`` package."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise FovealError(
            "affinitynet: crf=True needs the optional dense-CRF package pydensecrf2 (import name "
            "pydensecrf): pip install 'foveal[crf]' or pip install pydensecrf2. Without it use crf=False, "
            "the CRF-free default: confident regions are the argmax of the alpha-adjusted seeds."
        ) from e
    c, h, w = scores.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores.astype(np.float32))))
    sxy, compat = CRF_PARAMS["gaussian"]
    d.addPairwiseGaussian(sxy=sxy, compat=compat)
    sxy, srgb, compat = CRF_PARAMS["bilateral"]
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(image), compat=compat)
    return np.asarray(d.inference(CRF_PARAMS["iterations"]), dtype=np.float32).reshape(c, h, w)
