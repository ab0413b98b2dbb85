"""AffinityNet: learn inter-pixel affinities from explanation seeds, refine the seeds by a random walk.

Ahn and Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision" (CVPR 2018),
driven by ViT explanation seeds as in ``vit-lrp-affinitynet.txt`` section 4.3 (Table 4). Details
the text leaves open follow the authors' code (``jiwoon-ahn/psa``).

Registered as ``affinitynet`` (refiner) by :mod:`foveal.plugins.refiners`; the pair geometry,
seed labels, random walk and CRF it uses are in :mod:`foveal.refine`.

* **Affinity head** (section 4.3, psa ``resnet38_aff.Net``): 1x1 convolutions (no bias, ELU) on
  the last feature levels of a registered backbone, resized to the finest of them and
  concatenated, then a 1x1 convolution + ELU giving ``f`` (B, D, h, w).
* **Affinities** ``a_ij = exp(-mean_c |f_i - f_j|)`` (psa uses the mean over channels; the text
  writes a norm) for pairs of feature positions at distance ``0 < d < radius`` (radius 5, each
  unordered pair once: psa's ``search_dist``). ``pairs="psa"`` (default) keeps only the pairs psa
  forms: "from" positions at least ``radius - 1`` away from the left, right and bottom borders
  (:mod:`foveal.refine.pairs`), in training and in the random walk; ``pairs="all"`` keeps every
  pair inside the map.
* **Frozen layers** (psa ``resnet38d.Net.train`` and ``resnet38_aff.Net.not_training``): every
  BatchNorm stays in eval mode with its affine parameters fixed (``freeze_bn``), and the layers up
  to feature level ``freeze_levels - 1`` do not learn (psa: ``conv1a`` and the first residual stage
  ``b2``-``b2_2`` of ResNet-38; timm ResNet: ``conv1``/``bn1`` and ``layer1`` with the default 2).
  Both presuppose an ImageNet-pretrained backbone (``backbone_weights``); psa uses ResNet-38
  (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``), which timm lacks: any timm CNN works, e.g.
  ResNet-50 (levels ``[-3, -2, -1]`` = stride 8, 16, 32 for psa's conv4/5/6 at stride 8).
* **Affinity labels** from seeds ``M_c`` in [0, 1]: background ``(1 - max_c M_c)^alpha`` with
  ``alpha_low = 4`` (the argmax is foreground only where the seeds are strong: confident
  foreground) and ``alpha_high = 32`` (background only where seeds vanish: confident background);
  label = class of the alpha_low argmax where it is foreground, background where the alpha_high
  argmax is background, ignored (neutral) elsewhere. Scores are area-pooled to the feature grid
  before the argmax (psa ``AvgPool2d(8)``). ``crf=True`` first refines both score sets with a
  dense CRF (psa ``crf_inference`` parameters) -- needs the optional ``pydensecrf2`` package
  (``pip install 'foveal[crf]'``); the default CRF-free path takes the argmax directly.
* **Pair labels**: background-positive (both background), foreground-positive (same class),
  negative (different labels); pairs touching a neutral position are ignored.
* **Loss** (section 4.3): ``L_bg+/4 + L_fg+/4 + L-/2`` with ``L+ = -sum log(a + 1e-5) / (N + 1e-5)``
  and ``L- = -sum log(1 + 1e-5 - a) / (N- + 1e-5)``, each averaged over its own count in the
  batch (psa ``train_aff.py``).
* **Parameter groups** (psa ``get_parameter_groups`` + ``train_aff.py``): :meth:`parameter_groups`
  gives backbone weights (lr, weight decay), backbone biases (2x lr, no decay), new-layer weights
  (10x lr, decay) and new-layer biases (20x lr, no decay); frozen parameters are in none.
* **Random walk** (section 4.3, psa ``infer_aff.py``): ``A`` = affinities (1 on the diagonal)
  to the power ``beta``, column-normalised to ``T``; the seed scores ``[bg^walk_alpha,
  M_1..M_K]`` area-pooled to the feature grid are propagated ``vec(M) T^t``. ``walk_preset``
  names the two readings (:data:`~foveal.refine.random_walk.WALK_PRESETS`): ``"psa"`` beta 8,
  t 256 (the defaults of ``beta`` / ``steps``), ``"paper"`` beta 16, t 8 (section 4.3)
  (``walk="squaring"``: dense ``T`` raised by repeated squaring, as psa; ``walk="sparse"``: ``t``
  products with the sparse ``T``, the same result without the dense ``n x n`` matrix), then
  upsampled bilinearly. ``refine`` returns the scores divided by their sum over classes
  (argmax unchanged).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.modules import preserved_model_state
from ..core.refiner import Refiner
from ..core.tensors import check_images
from ..data.images import IMAGENET_MEAN, IMAGENET_STD, to_uint8
from ..refine.pairs import IGNORE, PairSet, pair_valid, partners
from ..refine.random_walk import WALK_PRESETS, random_walk
from ..refine.seeds import affinity_label_map, background_scores
from .backbones import build_backbone


def pair_affinities(features: torch.Tensor, radius: int, pairs: PairSet = "psa") -> torch.Tensor:
    """``a = exp(-mean_c |f(y, x) - f(y + dy, x + dx)|)`` for every offset: (B, P, h, w); entries
    that are not pairs of the set ``pairs`` are 0 (see :func:`pair_valid`)."""
    if features.dim() != 4:
        raise InputError(f"features: expected (B, D, h, w), got shape {tuple(features.shape)}")
    dist = torch.stack([(features - other).abs().mean(1) for other in partners(features, radius, 0.0)], 1)
    valid = pair_valid(features.shape[-2:], radius, features.device, pairs)
    return torch.exp(-dist) * valid


def pair_labels(labels: torch.Tensor, radius: int, pairs: PairSet = "psa"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background-positive, foreground-positive and negative pair labels (B, P, h, w) float from
    a label map (B, h, w) (0 = background, c + 1 = class c, :data:`IGNORE` = neutral), only for
    the pairs of the set ``pairs``."""
    other = torch.stack(partners(labels, radius, IGNORE), 1)
    labels = labels[:, None]
    valid = (labels != IGNORE) & (other != IGNORE) & pair_valid(labels.shape[-2:], radius, labels.device, pairs)
    same = (labels == other) & valid
    return (same & (labels == 0)).float(), (same & (labels != 0)).float(), (~same & valid).float()


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_bg+/4 + L_fg+/4 + L-/2``, each term averaged over its own pair count ``+ 1e-5`` (psa).

    ``counts`` (3,) replaces the batch's own pair counts (bg+, fg+, -) as denominators: under DDP the
    trainer passes the counts of the whole global batch divided by the number of processes, so the
    averaged gradients equal those of one process holding the whole batch (psa's DataParallel)."""
    if counts is None:
        counts = torch.stack([t.sum() for t in (bg_pos, fg_pos, neg)]).detach()
    counts = counts.to(aff.dtype) + 1e-5
    bg = (-bg_pos * torch.log(aff + 1e-5)).sum() / counts[0]
    fg = (-fg_pos * torch.log(aff + 1e-5)).sum() / counts[1]
    ng = (-neg * torch.log(1 + 1e-5 - aff)).sum() / counts[2]
    loss = bg / 4 + fg / 4 + ng / 2
    parts = {"bg_loss": float(bg.detach()), "fg_loss": float(fg.detach()), "neg_loss": float(ng.detach()),
             "bg_count": float(counts[0]), "fg_count": float(counts[1]), "neg_count": float(counts[2])}
    return loss, parts


# --- the refiner -----------------------------------------------------------------------------------

def check_seeds(seeds: Any, images: torch.Tensor) -> torch.Tensor:
    """Seeds (B, K, H, W) (or (B, H, W) for one class) in [0, 1] matching the images."""
    if not isinstance(seeds, torch.Tensor):
        raise InputError(f"seeds: expected a torch.Tensor, got {type(seeds).__name__}")
    if seeds.dim() == 3:
        seeds = seeds[:, None]
    b, _, h, w = images.shape
    if seeds.dim() != 4 or seeds.shape[0] != b or tuple(seeds.shape[-2:]) != (h, w):
        raise InputError(f"seeds: expected (B={b}, K, {h}, {w}) maps matching the images, got {tuple(seeds.shape)}")
    if not seeds.is_floating_point() or not bool(torch.isfinite(seeds).all()):
        raise InputError("seeds: expected finite floating-point maps")
    if float(seeds.min()) < -1e-6 or float(seeds.max()) > 1 + 1e-6:
        raise InputError(f"seeds: expected values in [0, 1], got [{float(seeds.min()):.3g}, {float(seeds.max()):.3g}]")
    return seeds.clamp(0, 1).to(images.dtype)


class AffinityNet(Refiner):
    """AffinityNet (Ahn & Kwak, CVPR 2018; vit-lrp-affinitynet.txt section 4.3, Table 4): an
    affinity head on backbone features trained from seed-derived pair labels, and a random walk
    that propagates the seeds along the learned affinities. ``forward(images)`` returns pair
    affinities (B, P, h, w) (:func:`pair_offsets` order); :meth:`refine` the refined class
    probabilities (B, K + 1, H, W), channel 0 background. See the module docstring."""

    class Config(ComponentConfig):
        backbone: str = Field("timm-backbone", description="Registered backbone giving multi-scale features.")
        backbone_options: dict[str, Any] = Field(
            default_factory=lambda: {"model_name": "resnet50"},
            description="Backbone config, e.g. {'model_name': 'resnet50'} for timm-backbone.")
        backbone_weights: str | None = Field(None, description="Local weights file for the backbone.")
        levels: list[int] = Field([-3, -2, -1], min_length=1, description="Backbone feature levels used (psa: "
                                  "conv4, conv5, conv6); resized to the finest of them.")
        level_channels: list[int] = Field([64, 128, 256], min_length=1,
                                          description="Output channels of the 1x1 conv on each level (psa 64/128/256).")
        feature_dim: int = Field(448, gt=0, description="Channels D of the affinity features f (psa 448).")
        radius: int = Field(5, ge=2, description="Pairs at distance 0 < d < radius are related (paper: 5).")
        pairs: Literal["psa", "all"] = Field(
            "psa", description="psa: only psa's pairs (no 'from' positions within radius - 1 of the left, right "
            "and bottom borders); all: every pair inside the map.")
        freeze_bn: bool = Field(True, description="BatchNorm in eval mode with fixed affine parameters (psa).")
        freeze_levels: int = Field(
            2, ge=0, description="Layers up to backbone feature level freeze_levels - 1 do not learn (psa: conv1a "
            "and stage b2 of ResNet-38 = timm ResNet conv1/bn1 + layer1 with 2); 0 = none.")
        alpha_low: float = Field(4.0, gt=0, description="Background power giving confident foreground.")
        alpha_high: float = Field(32.0, gt=0, description="Background power giving confident background.")
        crf: bool = Field(False, description="Refine the label scores with a dense CRF (needs pydensecrf2).")
        walk_preset: Literal["psa", "paper"] | None = Field(
            None, description="Named (beta, steps): psa = 8, 256 (psa infer_aff.py); paper = 16, 8 "
            "(vit-lrp-affinitynet.txt 4.3); None = beta and steps as given.")
        beta: float = Field(8.0, gt=0, description="Affinities are raised to beta in the transition matrix (psa 8).")
        steps: int = Field(256, ge=1, description="Random-walk steps t (psa: 2^8 by squaring).")
        walk: Literal["squaring", "sparse"] = Field(
            "squaring", description="squaring: dense T^t by repeated squaring (psa); sparse: t sparse products.")
        walk_alpha: float = Field(16.0, gt=0, description="Background power of the random-walk input (psa default 16).")
        mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Image normalisation mean (for the CRF).")
        std: tuple[float, float, float] = Field(IMAGENET_STD, description="Image normalisation std (for the CRF).")

        @model_validator(mode="before")
        @classmethod
        def _walk_preset(cls, data: Any) -> Any:
            preset = data.get("walk_preset") if isinstance(data, dict) else None
            if preset is None:
                return data
            if preset not in WALK_PRESETS:
                raise ValueError(f"walk_preset must be one of {sorted(WALK_PRESETS)} or None, got {preset!r}")
            data = dict(data)
            for key, value in WALK_PRESETS[preset].items():
                if key in data and float(data[key]) != value:
                    raise ValueError(f"{key}={data[key]} contradicts walk_preset={preset!r} ({key} {value}); "
                                     "give walk_preset=None to choose beta and steps yourself")
                data[key] = value
            return data

        @model_validator(mode="after")
        def _levels_match(self):
            if len(self.levels) != len(self.level_channels):
                raise ValueError(f"levels {self.levels} and level_channels {self.level_channels} differ in length")
            return self

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.backbone = build_backbone(cfg.backbone, cfg.backbone_options, cfg.backbone_weights, owner="affinitynet")
        channels = list(self.backbone.channels)
        try:
            in_channels = [channels[i] for i in cfg.levels]
        except IndexError as e:
            raise InputError(
                f"affinitynet: levels {cfg.levels} out of range for {len(channels)} backbone levels"
            ) from e
        self.reduce = nn.ModuleList(nn.Conv2d(c, o, 1, bias=False) for c, o in zip(in_channels, cfg.level_channels))
        self.fuse = nn.Conv2d(sum(cfg.level_channels), cfg.feature_dim, 1, bias=False)
        for conv in self.reduce:  # psa initialisation of the new layers
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)
        self._freeze()

    def _freeze(self) -> None:
        """psa's fixed parameters: BatchNorm affine parameters and the layers up to feature level
        ``freeze_levels - 1`` (in registration order, which is execution order in timm models); also
        the stages after the last used level, which do not reach the output (DDP needs every
        learning parameter to take part in the loss)."""
        cfg = self.config
        if cfg.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        body = getattr(self.backbone, "body", None)
        info = getattr(body, "feature_info", None)
        if info is None:
            if cfg.freeze_levels:
                raise InputError(f"affinitynet: freeze_levels={cfg.freeze_levels} needs a timm features backbone "
                                 f"(feature_info), {cfg.backbone!r} has none; give freeze_levels=0")
            return
        names = info.module_name()
        if cfg.freeze_levels > len(names):
            raise InputError(f"affinitynet: freeze_levels={cfg.freeze_levels} but the backbone has {len(names)} "
                             "feature levels")
        params = list(body.named_parameters())

        def end_of(level: int) -> int:
            """Index after the last parameter of the module of feature level ``level``."""
            name = names[level]
            inside = [i for i, (n, _) in enumerate(params)
                      if any(n.startswith(prefix + ".") for prefix in (name, name.replace(".", "_")))]
            return max(inside) + 1 if inside else 0

        if cfg.freeze_levels:
            for _, p in params[: end_of(cfg.freeze_levels - 1)]:
                p.requires_grad_(False)
        last = max(i % len(names) for i in cfg.levels)
        if last < len(names) - 1:
            for _, p in params[end_of(last):]:
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> AffinityNet:
        """As ``nn.Module.train``; with ``freeze_bn`` the BatchNorm layers stay in eval mode (psa)."""
        super().train(mode)
        if self.config.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def parameter_groups(self, lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                         bias_lr_mult: float = 2.0) -> list[dict[str, Any]]:
        """psa's four SGD groups (``get_parameter_groups`` + ``train_aff.py``): backbone weights (lr,
        decay), backbone biases (``bias_lr_mult`` x lr, no decay), new-layer weights (``head_lr_mult``
        x lr, decay), new-layer biases (``head_lr_mult * bias_lr_mult`` x lr, no decay). Parameters
        that do not learn (``requires_grad=False``) are left out; empty groups are dropped."""
        head = {id(p) for p in self.head_parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(h, b): [] for h in (False, True) for b in (False, True)}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[(id(p) in head, name.endswith("bias"))].append(p)
        out = []
        for (is_head, is_bias), params in groups.items():
            if params:
                mult = (head_lr_mult if is_head else 1.0) * (bias_lr_mult if is_bias else 1.0)
                out.append({"params": params, "lr": lr * mult, "weight_decay": 0.0 if is_bias else weight_decay,
                            "name": f"{'head' if is_head else 'backbone'} {'biases' if is_bias else 'weights'}"})
        return out

    @property
    def stride(self) -> int:
        """Downsampling of the affinity features relative to the input."""
        strides = list(self.backbone.strides)
        return min(strides[i] for i in self.config.levels)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers trained from scratch (psa gives them 10x the learning rate)."""
        return [*self.reduce.parameters(), *self.fuse.parameters()]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Affinity features f (B, D, h, w)."""
        check_images(images)
        feats = self.backbone(images)
        picked = [feats[i] for i in self.config.levels]
        size = max((f.shape[-2:] for f in picked), key=lambda s: s[0] * s[1])
        maps = []
        for conv, f in zip(self.reduce, picked):
            f = F.elu(conv(f))
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            maps.append(f)
        return F.elu(self.fuse(torch.cat(maps, 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pair_affinities(self.features(images), self.config.radius, self.config.pairs)

    def feature_size(self, images: torch.Tensor) -> tuple[int, int]:
        with torch.no_grad(), preserved_model_state(self):
            return tuple(self.features(images[:1]).shape[-2:])

    def label_map(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Affinity label map (B, h, w) of :func:`affinity_label_map` on this net's feature grid."""
        cfg = self.config
        seeds = check_seeds(seeds, check_images(images))
        rgb = to_uint8(images, cfg.mean, cfg.std) if cfg.crf else None
        return affinity_label_map(seeds, self.feature_size(images), alpha_low=cfg.alpha_low,
                                  alpha_high=cfg.alpha_high, crf=cfg.crf, images=rgb)

    def loss(self, images: torch.Tensor, label_map: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on a batch and its label maps (B, h, w) (see :func:`affinity_loss`)."""
        aff = self(images)
        if tuple(label_map.shape) != (aff.shape[0], *aff.shape[-2:]):
            expected = (aff.shape[0], *aff.shape[-2:])
            raise InputError(f"label_map: expected shape {expected}, got {tuple(label_map.shape)}")
        return affinity_loss(aff, *pair_labels(label_map.to(aff.device), self.config.radius, self.config.pairs))

    @torch.no_grad()
    def refine(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        seeds = check_seeds(seeds, check_images(images))
        with preserved_model_state(self):
            aff = self(images)
        scores = F.interpolate(background_scores(seeds, cfg.walk_alpha), size=aff.shape[-2:], mode="area")
        walked = random_walk(aff, scores.to(aff.dtype), beta=cfg.beta, steps=cfg.steps, radius=cfg.radius,
                             method=cfg.walk, pairs=cfg.pairs)
        walked = F.interpolate(walked, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp(min=0)
        return walked / walked.sum(1, keepdim=True).clamp(min=1e-12)
