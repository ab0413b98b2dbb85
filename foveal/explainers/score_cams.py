"""Score-weighted CAMs: Score-CAM and Abs-CAM (phase 2), which weight activation maps by the
model's score on inputs masked with them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.explainer import Targets, target_scores
from ..core.tensors import normalize_maps
from .cam import CAMBase, CAMConfig, fixed_targets, target_rows


class ScoreWeightedCAM(CAMBase):
    """Masked-input scoring shared by Score-CAM and Abs-CAM phase 2."""

    class Config(CAMConfig):
        batch_size: int = Field(32, ge=1, description="Masked images per forward pass (chunk size).")
        mask_align_corners: bool = Field(
            False,
            description="align_corners of the bilinear mask upsampling (pytorch-grad-cam's ScoreCAM uses "
            "True; False matches the final map's upsampling).",
        )
        progress: bool = Field(True, description="Show a tqdm progress bar when more than one chunk is needed.")

    def masks(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(n, h, w) low-resolution maps -> (n, 1, H, W) upsampled, per-map min-max normalised."""
        up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=self.config.mask_align_corners)
        return normalize_maps(up)

    @staticmethod
    def live(low: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: channel maps that are not constant. A map whose span is below 1e-5 of its
        largest magnitude counts as constant (float noise of a constant map must not be
        min-max-stretched into a 0/1 mask); its mask is all zero."""
        flat = low.flatten(2)
        span = flat.amax(2) - flat.amin(2)
        return span > 1e-5 * flat.abs().amax(2)

    def unique_maps(self, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deduplicate channel maps: returns ``(maps (J, h, w), image (J,), index (B, C))`` where
        ``index[b, k]`` is the row of ``maps`` giving channel k's mask, or -1 when the channel is
        constant (its mask is all zero). Identical low-resolution maps give identical masks, so
        every masked input is scored once (exact)."""
        b, c, h, w = low.shape
        flat = low.flatten(2)
        nonconst = self.live(low)
        index = torch.full((b, c), -1, dtype=torch.long, device=low.device)
        maps, image, offset = [], [], 0
        for i in range(b):
            idx = nonconst[i].nonzero()[:, 0]
            if idx.numel() == 0:
                continue
            uniq, inverse = torch.unique(flat[i, idx], dim=0, return_inverse=True)
            index[i, idx] = inverse + offset
            maps.append(uniq.view(-1, h, w))
            image += [i] * uniq.shape[0]
            offset += uniq.shape[0]
        maps_t = torch.cat(maps) if maps else low.new_zeros((0, h, w))
        return maps_t, torch.tensor(image, dtype=torch.long), index

    def masked_scores(self, model: nn.Module, images: torch.Tensor, low: torch.Tensor, fixed: Any) -> torch.Tensor:
        """Target scores (B, C) of ``images * mask_k`` for every channel map in ``low``
        (B, C, h, w), in chunks of ``batch_size``; never more than one chunk of masked images
        exists at a time (no B x C x 3 x H x W tensor)."""
        from tqdm.auto import tqdm

        size = tuple(images.shape[-2:])
        b, c = low.shape[:2]
        maps, image, index = self.unique_maps(low)
        job_scores = images.new_empty(maps.shape[0])
        bs = self.config.batch_size
        with torch.no_grad():
            bar = tqdm(total=maps.shape[0], disable=not self.config.progress or maps.shape[0] <= bs,
                       desc=f"{self.registry_name or type(self).__name__}: masked forwards", unit="img", leave=False)
            with bar:
                for j in range(0, maps.shape[0], bs):
                    rows = image[j : j + bs]
                    x = images[rows.to(images.device)] * self.masks(maps[j : j + bs], size)
                    job_scores[j : j + bs] = target_scores(model(x), target_rows(fixed, rows.tolist()))
                    bar.update(len(rows))
            scores = job_scores[index.clamp_min(0)] if maps.shape[0] else images.new_zeros((b, c))
            if bool((index < 0).any()):  # all-zero masks: one forward of a black image, shared
                zero = model(torch.zeros_like(images[:1]))
                zero_scores = target_scores(zero.expand(b, *zero.shape[1:]), fixed)
                scores = torch.where(index < 0, zero_scores[:, None].to(scores.dtype), scores)
        return scores


class ScoreCAM(ScoreWeightedCAM):
    """Score-CAM (Wang et al., CVPR-W 2020, section 3, eq. 3-6): each channel map ``A^k`` is
    upsampled to the input size and min-max normalised to a mask ``H^k``; the channel weight is
    the target score of ``X * H^k`` (class logit, or the callable target's score),
    softmax-normalised over the channels; map ``ReLU(sum_k w_k A^k)``.

    Conventions: the softmax runs over channels (as in pytorch-grad-cam; the baseline score
    ``f(X_b)`` of eq. 3 cancels in it). Exact shortcuts: channels with a constant map (all-zero
    mask) share one forward of a black image, and duplicate channel maps are scored once.
    Differences to pytorch-grad-cam's ``ScoreCAM``: masks are upsampled with
    ``align_corners=False`` (``mask_align_corners=True`` reproduces theirs to float precision),
    masks of constant channels are exactly zero (theirs divide by ``span + 1e-8``), and the final
    map is upsampled before min-max normalisation (theirs normalise at feature resolution and
    resize with OpenCV)."""

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, _, output = self.capture(model, images, targets, hooks, gradients=False)
        fixed = fixed_targets(output, targets)
        w = torch.softmax(self.masked_scores(model, images, a, fixed).to(a.dtype), dim=1)
        return F.relu((w[..., None, None] * a).sum(1))


class AbsCAM(ScoreWeightedCAM):
    """Abs-CAM (abs-cam.txt section 3, Algorithm 1).

    Phase 1 (eq. 1-3): ``W_k = mean_ij |dy^c/dA^k_ij|``. Phase 2 (eq. 4-5) is read per channel,
    which is what makes the sum over k in eq. 5 meaningful (with a single M_0 the phase would only
    rescale M_0): ``M_0^k = S(U(W_k A^k))`` (bilinear upsampling, per-channel min-max), ``M_1^k =
    M_0^k * X_0``, scores ``Y_c(M_1^k)`` softmax-normalised over the channels, and
    ``L = ReLU(sum_k softmax_k(Y_c(M_1)) M_0^k)`` at input resolution.

    Decisions: "softmax" is read as normalising the channel scores (the Score-CAM convention, which
    works for any target, segmentation regions included); ``Y_c`` is the target's logit score.
    Because S is per-channel min-max, ``W_k > 0`` cancels inside ``M_0^k``; phase 1 enters
    phase 2 by removing channels with ``W_k = 0`` (no gradient: an all-zero mask) and through the
    initial map, exposed as ``abs-cam-init``. Unlike Score-CAM the final map combines the
    normalised upsampled masks ``M_0^k`` (eq. 5), not the raw activations. Same chunking and exact
    shortcuts as Score-CAM."""

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, g, output = self.capture(model, images, targets, hooks)
        weighted = g.abs().mean(dim=(2, 3), keepdim=True) * a
        fixed = fixed_targets(output, targets)
        w = torch.softmax(self.masked_scores(model, images, weighted, fixed).to(a.dtype), dim=1)
        size = tuple(images.shape[-2:])
        out = images.new_zeros((a.shape[0], *size))
        w = w * self.live(weighted)  # constant channels have an all-zero mask M_0^k
        bs = self.config.batch_size
        for i in range(a.shape[0]):
            for k in range(0, a.shape[1], bs):
                m = self.masks(weighted[i, k : k + bs], size)[:, 0]
                out[i] += (w[i, k : k + bs, None, None].to(m.dtype) * m).sum(0)
        return F.relu(out)
