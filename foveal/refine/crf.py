"""Dense CRF (Kraehenbuehl & Koltun 2011) with the psa parameters; needs the optional
``pydensecrf2`` package (import name ``pydensecrf``; ``pip install 'foveal[crf]'``)."""

from __future__ import annotations

import numpy as np

from ..core.errors import FovealError

#: psa ``crf_inference``: iterations, Gaussian (sxy, compat), bilateral (sxy, srgb, compat)
CRF_PARAMS = {"iterations": 10, "gaussian": (3, 3), "bilateral": (80, 13, 10)}

MISSING = ("the dense CRF needs the optional package pydensecrf2 (import name pydensecrf): pip install "
           "'foveal[crf]' or pip install pydensecrf2. Without it use crf=False, the CRF-free default: confident "
           "regions are the argmax of the alpha-adjusted seeds.")


def _modules():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise FovealError(f"affinitynet: {MISSING}") from e
    return dcrf, unary_from_softmax


def crf_available() -> bool:
    """Whether the optional dense-CRF package can be imported."""
    try:
        _modules()
    except FovealError:
        return False
    return True


def require_crf() -> None:
    """Raise the message naming the optional extra when the dense-CRF package is missing."""
    _modules()


def dense_crf(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Dense-CRF marginals (C, H, W) of ``scores`` (C, H, W) on a uint8 RGB image (H, W, 3), with
    the psa parameters :data:`CRF_PARAMS`. Needs the optional ``pydensecrf2`` package."""
    dcrf, unary_from_softmax = _modules()
    c, h, w = scores.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores.astype(np.float32))))
    sxy, compat = CRF_PARAMS["gaussian"]
    d.addPairwiseGaussian(sxy=sxy, compat=compat)
    sxy, srgb, compat = CRF_PARAMS["bilateral"]
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(image), compat=compat)
    return np.asarray(d.inference(CRF_PARAMS["iterations"]), dtype=np.float32).reshape(c, h, w)
