"""Score- and perturbation-weighted CAMs: Score-CAM and Abs-CAM (phase 2), which weight
activation maps by the model's score on inputs masked with them, and Ablation-CAM, which weights
them by the score drop when they are removed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.errors import InputError
from ..core.explainer import Targets, target_scores
from ..core.tensors import normalize_maps
from .cam import CAMBase, CAMConfig, fixed_targets, replace_output, target_rows

Scorer = Callable[[torch.Tensor, Any], torch.Tensor]
MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_probabilities(output: torch.Tensor) -> torch.Tensor:
    """Softmax over the class dimension (dim 1) of (B, K) or (B, K, H, W) logits; a sigmoid when
    K == 1 (a single logit is a two-class softmax against a zero logit)."""
    return torch.sigmoid(output) if output.shape[1] == 1 else torch.softmax(output, dim=1)


def probability_scores(output: torch.Tensor, targets: Any) -> torch.Tensor:
    """The targets' scores on class probabilities instead of logits: ``softmax(y)_c`` for a class
    index (the official Score-CAM code's ``F.softmax(model(x * mask))[c]``); a callable target
    (e.g. :class:`~foveal.core.SegmentationTarget`) is applied to the probability map."""
    return target_scores(class_probabilities(output), targets)


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

    def upsample(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(n, h, w) -> (n, H, W), bilinear with ``mask_align_corners``."""
        return F.interpolate(maps[:, None], size=size, mode="bilinear",
                             align_corners=self.config.mask_align_corners)[:, 0]

    def masks(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(n, h, w) low-resolution maps -> (n, 1, H, W) upsampled, per-map min-max normalised."""
        return normalize_maps(self.upsample(maps, size))[:, None]

    @staticmethod
    def live(low: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: channel maps that are not constant. A map whose span is below 1e-5 of its
        largest magnitude counts as constant (float noise of a constant map must not be
        min-max-stretched into a 0/1 mask); its mask is all zero."""
        flat = low.flatten(2)
        span = flat.amax(2) - flat.amin(2)
        return span > 1e-5 * flat.abs().amax(2)

    def unique_maps(self, low: torch.Tensor, skip_constant: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deduplicate channel maps: returns ``(maps (J, h, w), image (J,), index (B, C))`` where
        ``index[b, k]`` is the row of ``maps`` giving channel k's mask, or -1 when the channel is
        constant and ``skip_constant`` (its mask is all zero). Identical low-resolution maps give
        identical masks, so every masked input is scored once (exact)."""
        b, c, h, w = low.shape
        flat = low.flatten(2)
        keep = self.live(low) if skip_constant else torch.ones((b, c), dtype=torch.bool, device=low.device)
        index = torch.full((b, c), -1, dtype=torch.long, device=low.device)
        maps, image, offset = [], [], 0
        for i in range(b):
            idx = keep[i].nonzero()[:, 0]
            if idx.numel() == 0:
                continue
            uniq, inverse = torch.unique(flat[i, idx], dim=0, return_inverse=True)
            index[i, idx] = inverse + offset
            maps.append(uniq.view(-1, h, w))
            image += [i] * uniq.shape[0]
            offset += uniq.shape[0]
        maps_t = torch.cat(maps) if maps else low.new_zeros((0, h, w))
        return maps_t, torch.tensor(image, dtype=torch.long), index

    def masked_scores(self, model: nn.Module, images: torch.Tensor, low: torch.Tensor, fixed: Any, *,
                      mask_fn: MaskFn | None = None, score: Scorer = target_scores) -> torch.Tensor:
        """Target scores (B, C) of ``images * mask_k`` for every channel map in ``low``
        (B, C, h, w), in chunks of ``batch_size``; never more than one chunk of masked images
        exists at a time (no B x C x 3 x H x W tensor).

        ``mask_fn(maps (n, h, w), image_index (n,)) -> (n, 1, H, W)`` turns maps into masks
        (default: per-map min-max, :meth:`masks`, with constant maps scored once as an all-zero
        mask); ``score(output, targets)`` scores the masked outputs (default: the targets' logit
        scores)."""
        from tqdm.auto import tqdm

        size = tuple(images.shape[-2:])
        b, c = low.shape[:2]
        maps, image, index = self.unique_maps(low, skip_constant=mask_fn is None)
        job_scores = images.new_empty(maps.shape[0])
        bs = self.config.batch_size
        with torch.no_grad():
            bar = tqdm(total=maps.shape[0], disable=not self.config.progress or maps.shape[0] <= bs,
                       desc=f"{self.registry_name or type(self).__name__}: masked forwards", unit="img", leave=False)
            with bar:
                for j in range(0, maps.shape[0], bs):
                    rows = image[j : j + bs]
                    chunk = maps[j : j + bs]
                    m = self.masks(chunk, size) if mask_fn is None else mask_fn(chunk, rows)
                    x = images[rows.to(images.device)] * m
                    job_scores[j : j + bs] = score(model(x), target_rows(fixed, rows.tolist()))
                    bar.update(len(rows))
            scores = job_scores[index.clamp_min(0)] if maps.shape[0] else images.new_zeros((b, c))
            if bool((index < 0).any()):  # all-zero masks: one forward of a black image, shared
                zero = model(torch.zeros_like(images[:1]))
                zero_scores = score(zero.expand(b, *zero.shape[1:]), fixed)
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

    Phase 1 (eq. 1-2): ``W_k = mean_ij |dy^c/dA^k_ij|``. Phase 2 (eq. 3-5), read per channel k
    (Algorithm 1 loops over k, and with a single M_0 the sum over k in eq. 5 would only rescale
    M_0): ``M_0^k = S(U(W_k A^k))`` with U = bilinear upsampling, ``M_1^k = M_0^k * X_0``, the
    masked image is "fed into the model and after softmax" scored ``Y_c(M_1^k)``, and
    ``L = ReLU(sum_k Y_c(M_1^k) M_0^k)`` at input resolution.

    Two readings of the loose parts, as options:

    * ``normalization``: what S normalises. ``"shared"`` (default): one min-max over the stack
      ``{U(W_k A^k)}_k`` of an image, so ``M_0^k = (U(W_k A^k) - m) / (M - m)`` and the weights
      ``W_k`` scale the masks. ``"per-channel"``: min-max of each ``U(W_k A^k)`` on its own; then
      ``minmax(W_k A^k) = minmax(A^k)`` for every ``W_k > 0``, so the |gradient| weights (the
      paper's contribution, phase 1) cancel and only ``W_k = 0`` (no gradient: an all-zero
      mask) has an effect.
    * ``score``: what ``Y_c(M_1)`` is. ``"probability"`` (default): the class probability
      ``softmax(f(M_1^k))_c`` of the masked image, as the text says ("after softmax") and as the
      official Score-CAM code scores masked images; a callable target (e.g. a
      ``SegmentationTarget``) is applied to the class-probability map (sigmoid for one output
      channel). ``"channel-softmax"``: the target's logit score of each masked image,
      softmax-normalised over the channels (pytorch-grad-cam's Score-CAM convention).

    The defaults are the reading in which every element of eq. 1-5 has an effect (the absolute
    gradients through the shared normalisation, the softmax through the class probability);
    ``normalization="per-channel", score="channel-softmax"`` is foveal's earlier reading. Unlike
    Score-CAM the final map combines the normalised upsampled masks ``M_0^k`` (eq. 5), not the
    raw activations. Same chunking and exact shortcuts as Score-CAM (duplicate maps scored once;
    per-channel: constant maps share one black image)."""

    class Config(ScoreWeightedCAM.Config):
        normalization: Literal["shared", "per-channel"] = Field(
            "shared", description="S of eq. 3: one min-max over all channels of an image (W_k scales the masks) "
            "or a min-max per channel (W_k > 0 cancels).")
        score: Literal["probability", "channel-softmax"] = Field(
            "probability", description="Y_c of eq. 5: class probability of the masked image, or the target's "
            "logit score softmax-normalised over the channels.")

    def channel_weights(self, g: torch.Tensor) -> torch.Tensor:
        """Eq. 2: ``W_k = (1/Z) sum_ij |dy^c/dA^k_ij|``, shape (B, C, 1, 1)."""
        return g.abs().mean(dim=(2, 3), keepdim=True)

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, g, output = self.capture(model, images, targets, hooks)
        weighted = self.channel_weights(g).to(a.dtype) * a
        fixed = fixed_targets(output, targets)
        size = tuple(images.shape[-2:])
        shared = self.config.normalization == "shared"
        lo, hi = self.upsampled_range(weighted, size)  # (B, C) each
        if shared:
            lo, hi = lo.amin(1, keepdim=True).expand_as(lo), hi.amax(1, keepdim=True).expand_as(hi)
            span = hi - lo
            ok = span > 1e-5 * torch.maximum(lo.abs(), hi.abs())  # all maps of the image equal: zero masks
        else:
            span, ok = hi - lo, self.live(weighted)

        def shared_masks(maps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            r = rows.to(maps.device)
            l, s, o = lo[r, :1, None], span[r, :1, None], ok[r, :1, None]
            return torch.where(o, (self.upsample(maps, size) - l) / torch.where(o, s, 1), 0.0)[:, None]

        scorer = probability_scores if self.config.score == "probability" else target_scores
        scores = self.masked_scores(model, images, weighted, fixed, mask_fn=shared_masks if shared else None,
                                    score=scorer).to(a.dtype)
        w = scores if self.config.score == "probability" else torch.softmax(scores, dim=1)
        w = w * ok  # channels with an all-zero mask M_0^k add nothing
        out = images.new_zeros((a.shape[0], *size))
        bs = self.config.batch_size
        for i in range(a.shape[0]):
            for k in range(0, a.shape[1], bs):
                sl = slice(k, k + bs)
                m = (self.upsample(weighted[i, sl], size) - lo[i, sl, None, None]) / torch.where(
                    ok[i, sl], span[i, sl], 1)[:, None, None]
                out[i] += (w[i, sl, None, None].to(m.dtype) * m).sum(0)
        return F.relu(out)

    def upsampled_range(self, maps: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel min and max (B, C) of the upsampled maps ``U(maps)``, in chunks of
        ``batch_size`` channels (bilinear upsampling does not reach the low-resolution extremes)."""
        b, c = maps.shape[:2]
        lo, hi = maps.new_empty((b, c)), maps.new_empty((b, c))
        bs = self.config.batch_size
        for i in range(b):
            for k in range(0, c, bs):
                up = self.upsample(maps[i, k : k + bs], size).flatten(1)
                lo[i, k : k + bs], hi[i, k : k + bs] = torch.aminmax(up, dim=1)
        return lo, hi


class AblationCAM(CAMBase):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020, method section): the weight of channel k is the
    relative drop of the target score when the channel's activation map is set to zero,
    ``w_k = (y^c - y^c_k) / y^c``, map ``ReLU(sum_k w_k A^k)``.

    Every ablation is one forward of the image with the target layer's output replaced (a
    forward hook) by the recorded activations with channel k zeroed, in chunks of up to
    ``batch_size`` copies of one image; the reference score ``y^c`` comes from the same kind of
    forward (recorded activations, nothing zeroed) in the image's first chunk, so the drops are
    free of batch-size-dependent float noise and an image's map does not depend on the rest of
    the batch. Targets are pinned to the clean prediction (``targets=None``: its top class /
    predicted region). Exact shortcut: a channel
    whose map is all zero is not ablated (zeroing it changes nothing, and ``A^k = 0`` adds
    nothing to the map). ViT token outputs (B, N, D) are ablated along D for every token (as
    pytorch-grad-cam's ``AblationLayerVit``); with a ``reshape`` function the channel axis is the
    raw output's last (else first) axis of the channel count.

    Differences to pytorch-grad-cam's ``AblationCAM``: the ablated value is always 0 (the paper);
    theirs is 0 only when the layer's minimum activation is 0 and ``min - 1e7`` otherwise. The
    division uses ``|y^c|``: for a negative score the paper's ratio (and theirs) would flip the
    sign of every weight, and for ``y^c = 0`` the raw drop is used (theirs divides by zero)."""

    class Config(CAMConfig):
        batch_size: int = Field(32, ge=1, description="Ablated copies per forward pass (chunk size).")
        progress: bool = Field(True, description="Show a tqdm progress bar when more than one chunk is needed.")

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        with self.recorded(model, images, hooks, gradients=False) as (layer, raw, output, output_is_tensor):
            pass
        a = self.grid(raw, model, images, layer)
        fixed = fixed_targets(output, targets)
        b, c = a.shape[:2]
        axis = self.channel_axis(raw, c)
        live = a.flatten(2).ne(0).any(2)  # (B, C): channels with a non-zero map
        # jobs per image: channel -1 (nothing ablated: the reference score) then every live channel;
        # chunks never mix images, so an image's scores do not depend on the rest of the batch
        bs = self.config.batch_size
        chunks: list[list[tuple[int, int]]] = []
        for i in range(b):
            per = [-1, *live[i].nonzero()[:, 0].tolist()]
            chunks += [[(i, k) for k in per[j : j + bs]] for j in range(0, len(per), bs)]
        n_jobs = sum(len(chunk) for chunk in chunks)
        scores = a.new_zeros((b, c + 1))  # column c: the unablated score
        replacement: list[torch.Tensor] = []
        with self.replaced_layer(layer, output_is_tensor, replacement, hooks):
            self._ablate(model, images, raw, a, fixed, chunks, n_jobs, axis, replacement, scores)
        base = scores[:, c]
        ablated = torch.where(live, scores[:, :c], base[:, None])
        scale = base.abs()
        w = (base[:, None] - ablated) / torch.where(scale > 0, scale, 1)[:, None]
        return F.relu((w[..., None, None] * a).sum(1))

    @staticmethod
    @contextmanager
    def replaced_layer(layer: nn.Module, output_is_tensor: bool, replacement: list, hooks: list) -> Iterator[None]:
        """While active, the target layer's output is ``replacement[0]``. A layer returning a
        plain tensor is not even run (its ``forward`` is shadowed by an instance attribute, as
        pytorch-grad-cam swaps in its ablation layer; removed on exit, even on exceptions);
        otherwise a forward hook replaces the first element of its output."""
        if output_is_tensor:
            had = "forward" in layer.__dict__
            saved = layer.__dict__.get("forward")
            layer.forward = lambda *args, **kwargs: replacement[0]
            try:
                yield
            finally:
                if had:
                    layer.forward = saved
                else:
                    del layer.forward
            return
        handle = layer.register_forward_hook(lambda module, args, out: replace_output(out, replacement[0]))
        hooks.append(handle)
        try:
            yield
        finally:
            handle.remove()

    def _ablate(self, model: nn.Module, images: torch.Tensor, raw: torch.Tensor, a: torch.Tensor, fixed: Any,
                chunks: list, n_jobs: int, axis: int, replacement: list, scores: torch.Tensor) -> None:
        from tqdm.auto import tqdm

        c = a.shape[1]
        shape = [1] * raw.dim()
        with torch.no_grad(), tqdm(total=n_jobs, disable=not self.config.progress or len(chunks) <= 1,
                                   desc=f"{self.registry_name or type(self).__name__}: ablations",
                                   unit="fwd", leave=False) as bar:
            for chunk in chunks:
                rows = torch.tensor([i for i, _ in chunk])
                chans = torch.tensor([k for _, k in chunk])
                keep = torch.ones((len(chunk), c + 1), dtype=raw.dtype, device=raw.device)
                keep[torch.arange(len(chunk), device=raw.device), chans.to(raw.device)] = 0  # -1: spare column
                shape[0], shape[axis] = len(chunk), c
                replacement[:] = [raw[rows.to(raw.device)] * keep[:, :c].reshape(shape)]
                out = model(images[rows.to(images.device)])
                scores[rows, torch.where(chans < 0, c, chans)] = target_scores(
                    out, target_rows(fixed, rows.tolist())).to(a.dtype)
                bar.update(len(chunk))

    def channel_axis(self, raw: torch.Tensor, c: int) -> int:
        """Axis of the raw layer output holding the C channels of the grid."""
        if self.reshape is None:
            if raw.dim() in (3, 4):
                return 1 if raw.dim() == 4 else 2
        else:
            for axis in (raw.dim() - 1, 1):
                if axis > 0 and raw.shape[axis] == c:
                    return axis
        raise InputError(
            f"ablation-cam: cannot tell the channel axis of the target layer output {tuple(raw.shape)} "
            f"({c} channels in the grid); expected (B, C, h, w) or (B, N, C) tokens"
        )
