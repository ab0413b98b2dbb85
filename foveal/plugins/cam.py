"""Class activation maps: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, SmoothGrad-CAM++, Score-CAM,
Abs-CAM (and its phase-1 map) and attention-guided CAM.

Every explainer here reads one *target layer* (a dotted module name, a module, or ``None`` for the
automatic choice described in :meth:`_CAM.find_layer`), captures its output ``A`` (B, C, h, w)
with a forward hook, and, for the gradient methods, the gradient ``G = dy^c/dA`` of the target
score with ``torch.autograd.grad`` taken to that activation only (the hook swaps the layer output
for a detached leaf, so nothing upstream of the layer is back-propagated and no parameter
``.grad`` is touched). ViT token outputs (B, N, D) are turned into a (B, D, h, w) grid with the
class/register tokens dropped (timm's ``num_prefix_tokens`` when the model has it, else inferred
from the token count and the image aspect ratio), or with a user ``reshape`` function.

``explain`` (from :class:`~foveal.core.explainer.Explainer`) upsamples the raw maps bilinearly
(``align_corners=False``) to the input size and min-max normalises them per image; constant maps
become zeros.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.checkpoint import read_state_dict
from ..core.config import ComponentConfig
from ..core.errors import CheckpointError, InputError
from ..core.explainer import Explainer, SegmentationTarget, Targets, target_scores
from ..core.modules import resolve_layer
from ..core.tensors import normalize_maps
from ..registry import hookimpl

Reshape = Callable[[torch.Tensor], torch.Tensor]

#: model -> automatically chosen layer name (see _CAM.find_layer); weak keys, so models are freed.
_AUTO_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CAMConfig(ComponentConfig):
    target_layer: str | None = Field(
        None,
        description="Dotted name of the layer whose output is explained (e.g. 'layer4', 'stages.3', "
        "'blocks.11.norm1'); None picks the last convolutional stage automatically (timm "
        "feature_info, blocks[-1].norm1 for ViTs, else the last module with a strided 4-D output).",
    )


class _CAM(Explainer):
    """Shared machinery: target-layer lookup, activation/gradient capture, token reshaping.

    Besides the config, ``target_layer`` may be given as a module when constructing the class
    directly (``GradCAM(target_layer=model.layer4)``) and ``reshape`` is a function mapping the
    layer output to (B, C, h, w) (applied to activations and gradients alike). Both are plain
    attributes (``explainer.layer``, ``explainer.reshape``) that can be set after
    ``registry.build``; they are not part of the saved config.
    """

    Config = CAMConfig

    def __init__(self, config: Any = None, *, reshape: Reshape | None = None, **overrides: Any) -> None:
        layer = overrides.get("target_layer")
        self.layer: nn.Module | None = None
        if isinstance(layer, nn.Module):
            self.layer = overrides.pop("target_layer")
        super().__init__(config, **overrides)
        self.reshape = reshape

    def attribute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        """Raw maps (B, h, w) from :meth:`compute`; a map whose span is below 1e-5 of its largest
        magnitude is float noise around a constant and becomes exactly zero (``explain`` would
        otherwise min-max-stretch the noise into a full-range pattern)."""
        self.check_input(model, images)
        raw = self.compute(model, images, targets, hooks)
        lo, hi = torch.aminmax(raw.detach().flatten(1), dim=1)
        constant = (hi - lo) <= 1e-5 * torch.maximum(lo.abs(), hi.abs())
        return torch.where(constant[:, None, None], 0.0, raw)

    def compute(
        self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- target layer ---------------------------------------------------------------------
    def find_layer(self, model: nn.Module, images: torch.Tensor) -> nn.Module:
        """The target layer: ``self.layer`` (a module), else ``config.target_layer`` (a dotted
        name; unknown names raise :class:`InputError` with close matches), else automatic:

        1. a timm ViT-like model (``num_prefix_tokens`` and ``blocks``): ``blocks[-1].norm1``
           (the last block's output only reaches a CLS-token head through the class token, so its
           patch tokens have zero gradient; the input of the last attention is the usual choice);
        2. a timm classifier with ``feature_info``: its last feature stage (``layer4`` for ResNets,
           ``stages.3`` for ConvNeXt, the last pool of ``features`` for VGG, ...);
        3. anything else (torchvision classifiers, segmentation models): one probe forward without
           gradients; the last module to finish with a 4-D output smaller than the input and larger
           than 1 x 1 (``layer4`` of a torchvision ResNet), skipping outputs with as many channels
           as a segmentation output (logit heads). For segmentation models this is the last
           low-resolution decoder feature before the head; pass ``target_layer`` to choose.

        The automatic choice is cached per model (weakly).
        """
        if self.layer is not None:
            return resolve_layer(model, self.layer)
        if self.config.target_layer is not None:
            return resolve_layer(model, self.config.target_layer)
        name = _AUTO_LAYERS.get(model)
        if name is None:
            name = _timm_default_layer(model) or _probe_default_layer(model, images)
            _AUTO_LAYERS[model] = name
        return resolve_layer(model, name)

    # --- capture --------------------------------------------------------------------------
    def capture(
        self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list, *, gradients: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One forward (and, with ``gradients``, one ``autograd.grad`` to the layer output).

        Returns ``(A, G, output)``: activations and gradients as (B, C, h, w) grids (``G`` is None
        without ``gradients``) and the model output (detached). With ``gradients`` the forward runs
        without autograd up to the target layer and records the graph only from the layer on, so
        it costs less than a plain forward with gradients enabled.
        """
        layer = self.find_layer(model, images)
        store: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(t, torch.Tensor):
                raise InputError(
                    f"target layer {type(module).__name__} returned {type(t).__name__}, expected a tensor"
                )
            if not gradients:
                store.append(t.detach().clone())  # clone: later in-place ops must not change it
                return None
            torch.set_grad_enabled(True)  # record the graph from here on only (see below)
            leaf = t.detach().requires_grad_(True)
            store.append(leaf)
            out = leaf.clone()  # the model may modify its layer output in place (x += identity)
            if isinstance(output, tuple):
                return (out, *output[1:])
            if isinstance(output, list):
                return [out, *output[1:]]
            return out

        handle = layer.register_forward_hook(hook)
        hooks.append(handle)  # removed by explain() whatever happens; also removed below when done
        try:
            if gradients:
                # Upstream of the layer no graph is needed: run without grad and let the hook
                # switch grad mode on at the layer (the context restores the caller's mode).
                with torch.no_grad():
                    output = model(images)
                    if not store:
                        raise InputError(f"target layer {type(layer).__name__} did not run during the forward pass")
                    scores = target_scores(output, targets)
                    (grad,) = torch.autograd.grad(scores.sum(), store[-1], allow_unused=True)
            else:
                with torch.no_grad():
                    output = model(images)
                grad = None
        finally:
            handle.remove()
        if not store:
            raise InputError(f"target layer {type(layer).__name__} did not run during the forward pass")
        act = self.grid(store[-1].detach(), model, images, layer)
        if not gradients:
            return act, None, output
        if grad is None:
            raise InputError(
                f"the target score does not depend on the target layer {type(layer).__name__}; "
                "choose a layer the output is computed from"
            )
        return act, self.grid(grad, model, images, layer), output.detach()

    def grid(self, t: torch.Tensor, model: nn.Module, images: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Layer output -> (B, C, h, w): ``reshape`` if given, 4-D as is, 3-D tokens to a grid."""
        if self.reshape is not None:
            g = self.reshape(t)
            if not isinstance(g, torch.Tensor) or g.dim() != 4:
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise InputError(f"reshape: expected a (B, C, h, w) tensor, got {got}")
            return g
        if t.dim() == 4:
            return t
        if t.dim() == 3:
            return tokens_to_grid(t, model, layer, tuple(images.shape[-2:]))
        raise InputError(
            f"target layer output has shape {tuple(t.shape)}; expected (B, C, h, w) feature maps or "
            "(B, N, D) tokens (give reshape=fn for other layouts)"
        )

    def check_input(self, model: nn.Module, images: torch.Tensor) -> None:
        """Channel count against the model's first convolution (clearer than a conv error)."""
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None and images.shape[1] != conv.in_channels:
            raise InputError(
                f"images: the model's first convolution expects {conv.in_channels} channels in dim 1 "
                f"(B, C, H, W), got a tensor of shape {tuple(images.shape)}"
            )


# --- layer helpers ----------------------------------------------------------------------------

def _timm_default_layer(model: nn.Module) -> str | None:
    names = {n for n, _ in model.named_modules()}
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "num_prefix_tokens") and isinstance(blocks, nn.Sequential) and len(blocks):
        name = f"blocks.{len(blocks) - 1}.norm1"
        if name in names:
            return name
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], Mapping):
        name = info[-1].get("module")
        if name in names:
            return name
    return None


def _probe_default_layer(model: nn.Module, images: torch.Tensor) -> str:
    fired: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    h_in, w_in = images.shape[-2:]

    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                fired.append((name, tuple(output.shape)))
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            out = model(images[:1])
    finally:
        for h in handles:
            h.remove()
    # a segmentation head's logits (as many channels as the output) are the prediction, not features
    logits = out.shape[1] if isinstance(out, torch.Tensor) and out.dim() == 4 else None
    for name, shape in reversed(fired):
        if (len(shape) == 4 and shape[2] * shape[3] > 1 and (shape[2] < h_in or shape[3] < w_in)
                and shape[1] != logits):
            return name
    raise InputError(
        f"target_layer=None: found no layer of {type(model).__name__} with a spatial (B, C, h, w) output; "
        "pass target_layer='...' (and reshape=fn for token outputs)"
    )


def tokens_to_grid(t: torch.Tensor, model: nn.Module, layer: nn.Module, image_hw: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, h, w), dropping the ``num_prefix_tokens`` leading class/register
    tokens (from the timm model containing ``layer``; inferred as the fewest leading tokens whose
    removal leaves a grid of the image's aspect ratio when no such model is found)."""
    b, n, d = t.shape
    owner = next((m for m in model.modules() if hasattr(m, "num_prefix_tokens") and
                  any(x is layer for x in m.modules())), None)
    if owner is not None:
        prefixes = [int(owner.num_prefix_tokens)]
        grid_size = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
    else:
        prefixes, grid_size = list(range(min(n, 9))), None
    for p in prefixes:
        m = n - p
        hw = None
        if grid_size is not None and int(grid_size[0]) * int(grid_size[1]) == m:
            hw = (int(grid_size[0]), int(grid_size[1]))
        else:
            hw = _grid_shape(m, image_hw)
        if hw is not None:
            return t[:, p:].reshape(b, hw[0], hw[1], d).permute(0, 3, 1, 2)
    raise InputError(
        f"cannot arrange {n} tokens (after dropping {prefixes} prefix tokens) into a grid of the image's "
        f"aspect ratio {image_hw}; pass reshape=fn mapping (B, N, D) to (B, D, h, w)"
    )


def _grid_shape(m: int, image_hw: tuple[int, int]) -> tuple[int, int] | None:
    if m <= 0:
        return None
    ratio = image_hw[0] / image_hw[1]
    guess = max(1, round(math.sqrt(m * ratio)))
    for h in (guess, guess - 1, guess + 1):
        if h > 0 and m % h == 0:
            w = m // h
            if abs(h / w - ratio) <= 0.25 * ratio:
                return h, w
    return None


# --- gradient methods ---------------------------------------------------------------------------

class _GradientCAM(_CAM):
    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, g, _ = self.capture(model, images, targets, hooks)
        return self.combine(a, g)

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GradCAM(_GradientCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2; attention-guided-cam.txt section 3.1,
    eq. 1-3): channel weights ``w_k = mean_ij dy^c/dA^k_ij``, map ``ReLU(sum_k w_k A^k)``.

    Matches captum's ``LayerGradCam`` (``relu_attributions=True``) followed by bilinear upsampling
    and per-image min-max normalisation."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w = g.mean(dim=(2, 3), keepdim=True)
        return F.relu((w * a).sum(1))


def gradcampp_weights(a: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor,
                      relu_grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ eq. 19: ``alpha_ij = g2_ij / (2 g2_ij + sum_ab A_ab * g3_ij)``, zero where the
    gradient (or the denominator) is zero; weights ``w_k = sum_ij alpha_ij ReLU(dY/dA_ij)``."""
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3
    ok = (g1 != 0) & (denom != 0)
    alpha = torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * relu_grad).sum(dim=(2, 3), keepdim=True)


class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19). With the exponential class score
    ``Y = exp(S)`` of section 3.2 the higher derivatives are ``exp(S) g^2`` and ``exp(S) g^3``
    (``g = dS/dA``, piecewise-linear networks), so ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)``;
    the positive factor ``exp(S)`` in ``ReLU(dY/dA)`` scales each map uniformly and is dropped
    (it cancels in the min-max normalisation). ``alpha`` is zero where the gradient is zero."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g2 = g * g
        w = gradcampp_weights(a, g, g2, g2 * g, F.relu(g))
        return F.relu((w * a).sum(1))


class XGradCAM(_GradientCAM):
    """XGrad-CAM (Fu et al., BMVC 2020, eq. 9): ``w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij``,
    map ``ReLU(sum_k w_k A^k)``; a channel whose activations sum to zero gets weight 0 (the
    reference code adds 1e-7 to the denominator instead)."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = a.sum(dim=(2, 3), keepdim=True)
        safe = torch.where(s != 0, s, torch.ones_like(s))
        w = torch.where(s != 0, (a * g).sum(dim=(2, 3), keepdim=True) / safe, torch.zeros_like(s))
        return F.relu((w * a).sum(1))


class LayerCAM(_GradientCAM):
    """Layer-CAM (Jiang et al., IEEE TIP 2021, eq. 5-6): per-location weights ``ReLU(g^k_ij)``,
    map ``ReLU(sum_k ReLU(g^k_ij) A^k_ij)``."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.relu((F.relu(g) * a).sum(1))


class AbsCAMInit(_GradientCAM):
    """Abs-CAM phase 1, the initial saliency map (abs-cam.txt section 3.1, eq. 1-3, "Abs-CAM_init"
    of section 4.1.4): ``W_k = (1/Z) sum_ij |dy^c/dA^k_ij|`` and ``M_0 = S(U(sum_k W_k A^k))``
    with U = bilinear upsampling and S = min-max normalisation (done by ``explain``; no ReLU,
    as in eq. 3)."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (g.abs().mean(dim=(2, 3), keepdim=True) * a).sum(1)


class SmoothGradCAMpp(_CAM):
    """SmoothGrad-CAM++ (Omeiza et al., 2019): Grad-CAM++ (eq. 19) with the first, second and
    third derivatives averaged over ``n_samples`` noisy copies of the input (SmoothGrad,
    Smilkov et al. 2017: Gaussian noise of std ``noise_level * (max - min)`` of each image).
    Activations come from the clean input (as in torchcam); ``ReLU`` is applied to the averaged
    first derivative. ``targets=None`` is the top class of the clean input. The noise is drawn
    from a CPU generator seeded with ``seed``, so maps are reproducible on any device."""

    class Config(CAMConfig):
        n_samples: int = Field(8, ge=1, description="Number of noisy copies averaged.")
        noise_level: float = Field(
            0.15, ge=0.0, description="Noise std as a fraction of each image's value range (SmoothGrad: 0.1-0.2)."
        )
        seed: int = Field(0, description="Seed of the noise generator (maps are deterministic given it).")

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, _, output = self.capture(model, images, targets, hooks, gradients=False)
        fixed = fixed_targets(output, targets)
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1)
        sigma = self.config.noise_level * span
        d1 = d2 = d3 = None
        for _ in range(self.config.n_samples):
            noise = torch.randn(images.shape, generator=gen, dtype=images.dtype).to(images.device)
            _, g, _ = self.capture(model, images + sigma * noise, fixed, hooks)
            d1 = g if d1 is None else d1 + g
            g2 = g * g
            d2 = g2 if d2 is None else d2 + g2
            d3 = g2 * g if d3 is None else d3 + g2 * g
        n = self.config.n_samples
        d1, d2, d3 = d1 / n, d2 / n, d3 / n
        w = gradcampp_weights(a, d1, d2, d3, F.relu(d1))
        return F.relu((w * a).sum(1))


# --- score-weighted methods -------------------------------------------------------------------

def fixed_targets(output: torch.Tensor, targets: Targets) -> Any:
    """Targets pinned to the *original* prediction, for scoring perturbed inputs.

    ``None`` becomes the top class per image (classification) or a :class:`SegmentationTarget`
    whose region is the original predicted region (segmentation, same category choice as
    ``targets=None`` in core). Ints and tensors become a list of B class indices; sequences and
    batch callables are returned unchanged. Validated on ``output`` (out-of-range classes raise).
    """
    b = output.shape[0]
    if targets is None:
        if output.dim() == 2:
            fixed: Any = output.argmax(1).tolist()
        elif output.dim() == 4 and output.shape[1] == 1:
            fixed = [SegmentationTarget(0, (output[i, 0] > 0).to(output.dtype)) for i in range(b)]
        elif output.dim() == 4:
            pred = output.argmax(1)
            fixed = []
            for i in range(b):
                areas = torch.stack([(pred[i] == c).sum() for c in range(1, output.shape[1])])
                c = int(areas.argmax()) + 1
                fixed.append(SegmentationTarget(c, (pred[i] == c).to(output.dtype)))
        else:
            raise InputError(f"targets=None: expected model output (B, K) or (B, K, H, W), got {tuple(output.shape)}")
    elif isinstance(targets, int):
        fixed = [targets] * b
    elif isinstance(targets, torch.Tensor):
        fixed = [int(targets)] * b if targets.dim() == 0 else targets
    else:
        fixed = targets
    target_scores(output, fixed)  # validate once, on the original output
    return fixed


def _rows(fixed: Any, index: list[int]) -> Any:
    if callable(fixed) and not isinstance(fixed, torch.Tensor):
        return fixed  # batch callable: applied row-wise to the masked outputs
    seq = fixed.tolist() if isinstance(fixed, torch.Tensor) else list(fixed)
    return [seq[i] for i in index]


class _ScoreWeighted(_CAM):
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
                    job_scores[j : j + bs] = target_scores(model(x), _rows(fixed, rows.tolist()))
                    bar.update(len(rows))
            scores = job_scores[index.clamp_min(0)] if maps.shape[0] else images.new_zeros((b, c))
            if bool((index < 0).any()):  # all-zero masks: one forward of a black image, shared
                zero = model(torch.zeros_like(images[:1]))
                zero_scores = target_scores(zero.expand(b, *zero.shape[1:]), fixed)
                scores = torch.where(index < 0, zero_scores[:, None].to(scores.dtype), scores)
        return scores


class ScoreCAM(_ScoreWeighted):
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


class AbsCAM(_ScoreWeighted):
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


# --- attention-guided CAM -------------------------------------------------------------------

class AttentionGuidedCAM(_GradientCAM):
    """Attention map-guided CAM (attention-guided-cam.txt sections 3.1-3.2, eq. 1-7): the
    Grad-CAM-weighted feature maps ``F_k = w_k A^k`` (eq. 2-4) pass a channel attention
    ``Mc(F) = sigma(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` (eq. 6) and then a spatial attention
    ``Ms(F') = sigma(f7x7([AvgPool_c(F'); MaxPool_c(F')]))`` (eq. 7), applied sequentially as in
    CBAM (Woo et al. 2018): ``F' = Mc(F) * F``, ``F'' = Ms(F') * F'``; map ``ReLU(sum_k F''_k)``.

    The paper does not say where the MLP and convolution weights come from. Two modes:

    * ``channels=None`` (default, needs no training): the MLP is the identity MLP of a CBAM with
      reduction 1 (``W1 = W2 = I``, zero biases, so ``MLP(x) = ReLU(x)``) and the 7 x 7 filter
      averages the two pooled maps with a normalised Gaussian of std ``sigma`` (replicate padding).
      Because sigmoids saturate, each attention's input is divided by its per-image maximum
      magnitude, making the default invariant to the scale of the gradients. Both attentions are
      then monotone in the Grad-CAM evidence: they sharpen it without training.
    * ``channels=C``: a CBAM module (``mlp.0`` Linear C -> C/reduction, ReLU, ``mlp.2`` Linear
      back to C; ``conv`` Conv2d 2 -> 1, kernel_size, zero padding) applied to the raw features,
      with weights from ``weights`` (a local .safetensors/.pth file with those keys), from
      ``load_state_dict``, or trained by the user on ``explainer.attention``. These tensors are the
      explainer's state, so ``foveal.save``/``foveal.load`` keep them.
    """

    class Config(CAMConfig):
        channels: int | None = Field(
            None, ge=1,
            description="Channels C of the target layer for trained CBAM weights; None = training-free default.",
        )
        reduction: int = Field(16, ge=1, description="MLP reduction ratio r (hidden C // r) of the trained module.")
        kernel_size: int = Field(7, ge=1, description="Spatial attention kernel size (7 in eq. 7); odd.")
        sigma: float = Field(1.0, gt=0, description="Std of the Gaussian of the training-free spatial attention.")
        weights: str | None = Field(None, description="Local file with trained attention weights (needs channels).")

    def __init__(self, config: Any = None, *, reshape: Reshape | None = None, **overrides: Any) -> None:
        super().__init__(config, reshape=reshape, **overrides)
        cfg = self.config
        if cfg.kernel_size % 2 == 0:
            raise InputError(f"attention-guided-cam: kernel_size must be odd, got {cfg.kernel_size}")
        self.attention: nn.Module | None = None
        if cfg.channels is not None:
            hidden = max(1, cfg.channels // cfg.reduction)
            att = nn.Module()
            att.mlp = nn.Sequential(nn.Linear(cfg.channels, hidden), nn.ReLU(), nn.Linear(hidden, cfg.channels))
            att.conv = nn.Conv2d(2, 1, cfg.kernel_size, padding=cfg.kernel_size // 2)
            self.attention = att
            if cfg.weights:
                self.load_state_dict(read_state_dict(cfg.weights))
        elif cfg.weights:
            raise InputError("attention-guided-cam: weights needs channels=C (the target layer's channel count)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.attention is None:
            return {}
        return {k: v.detach() for k, v in self.attention.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        if self.attention is None:
            return super().load_state_dict(state, strict)
        try:
            return self.attention.load_state_dict(dict(state), strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"attention-guided-cam: the weights do not fit the attention module: {e}") from e

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        f = g.mean(dim=(2, 3), keepdim=True) * a
        if self.attention is None:
            f = f * self._default_channel(f)
            f = f * self._default_spatial(f)
        else:
            f = f * self._trained_channel(f)
            f = f * self._trained_spatial(f)
        return F.relu(f.sum(1))

    @staticmethod
    def _scaled(x: torch.Tensor) -> torch.Tensor:
        s = x.abs().flatten(1).amax(1).clamp_min(torch.finfo(x.dtype).tiny)
        return x / s.view(-1, *([1] * (x.dim() - 1)))

    def _default_channel(self, f: torch.Tensor) -> torch.Tensor:
        pooled = self._scaled(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1))
        avg, mx = pooled.chunk(2, dim=1)
        return torch.sigmoid(F.relu(avg) + F.relu(mx))[..., None, None]

    def _default_spatial(self, f: torch.Tensor) -> torch.Tensor:
        k = self.config.kernel_size
        r = torch.arange(k, dtype=f.dtype, device=f.device) - k // 2
        g1 = torch.exp(-(r**2) / (2 * self.config.sigma**2))
        kernel = torch.outer(g1, g1)
        kernel = (kernel / kernel.sum() / 2).expand(1, 2, k, k)
        pooled = self._scaled(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1))
        pooled = F.pad(pooled, (k // 2,) * 4, mode="replicate")
        return torch.sigmoid(F.conv2d(pooled, kernel))

    def _trained_channel(self, f: torch.Tensor) -> torch.Tensor:
        mlp = self.attention.mlp
        if f.shape[1] != mlp[0].in_features:
            raise InputError(
                f"attention-guided-cam: the attention module was built for {mlp[0].in_features} channels, "
                f"the target layer has {f.shape[1]}"
            )

        def run(x: torch.Tensor) -> torch.Tensor:
            h = F.relu(F.linear(x, mlp[0].weight.to(x), mlp[0].bias.to(x)))
            return F.linear(h, mlp[2].weight.to(x), mlp[2].bias.to(x))

        return torch.sigmoid(run(f.mean(dim=(2, 3))) + run(f.amax(dim=(2, 3))))[..., None, None]

    def _trained_spatial(self, f: torch.Tensor) -> torch.Tensor:
        conv = self.attention.conv
        pooled = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)
        return torch.sigmoid(F.conv2d(pooled, conv.weight.to(f), conv.bias.to(f), padding=conv.padding))


@hookimpl
def register_components(register):
    register("grad-cam", GradCAM, aliases=("gradcam",))
    register("grad-cam++", GradCAMPlusPlus, aliases=("gradcam++", "grad-cam-plus-plus"))
    register("xgrad-cam", XGradCAM, aliases=("xgradcam",))
    register("layer-cam", LayerCAM, aliases=("layercam",))
    register("smoothgrad-cam++", SmoothGradCAMpp, aliases=("smooth-grad-cam++", "smoothgradcampp"))
    register("score-cam", ScoreCAM, aliases=("scorecam",))
    register("abs-cam", AbsCAM, aliases=("abscam",))
    register("abs-cam-init", AbsCAMInit)
    register("attention-guided-cam", AttentionGuidedCAM, aliases=("ag-cam",))
