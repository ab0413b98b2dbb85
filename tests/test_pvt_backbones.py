"""PVTv2 backbones: shapes, channels, official/timm weight layouts, clear key errors."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from foveal import registry
from foveal.core.errors import CheckpointError
from foveal.testing import check_component

CHANNELS = {"b0": [32, 64, 160, 256], **{b: [64, 128, 320, 512] for b in ("b1", "b2", "b3", "b4", "b5")}}
DEPTHS = {"b0": [2, 2, 2, 2], "b1": [2, 2, 2, 2], "b2": [3, 4, 6, 3], "b3": [3, 4, 18, 3],
          "b4": [3, 8, 27, 3], "b5": [3, 6, 40, 3]}


@pytest.mark.parametrize("variant", list(CHANNELS))
def test_channels_strides_depths(variant):
    with torch.device("meta"):
        b = registry.build(f"pvt-v2-{variant}")
    assert b.channels == CHANNELS[variant]
    assert b.strides == [4, 8, 16, 32]
    assert [b.stage_settings(i)["depth"] for i in range(4)] == DEPTHS[variant]
    assert [b.stage_settings(i)["sr_ratio"] for i in range(4)] == [8, 4, 2, 1]


def test_forward_shapes_and_odd_sizes():
    b = registry.build("pvt-v2-b0").eval()
    feats = b(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]
    feats = b(torch.randn(1, 3, 70, 70))  # not a multiple of 32: rounded up
    assert [f.shape[-1] for f in feats] == [18, 9, 5, 3]


def test_check_component_round_trip():
    check_component("pvt-v2-b0")


def _to_official(key: str) -> str:
    """The inverse of the mapping, written independently: timm features_only -> official PVTv2."""
    key = key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
    if key.startswith("patch_embed."):
        return "patch_embed1." + key[len("patch_embed."):]
    m = re.match(r"stages_(\d)\.(downsample|blocks|norm)\.(.*)", key)
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "downsample":
        return f"patch_embed{i + 1}.{rest}"
    if part == "blocks":
        return f"block{i + 1}.{rest}"
    return f"norm{i + 1}.{rest}"


def _random_state(backbone) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) for k, v in backbone.body.state_dict().items()}


def test_official_pth_layout_loads(tmp_path):
    ref = registry.build("pvt-v2-b0")
    state = _random_state(ref)
    official = {_to_official(k): v for k, v in state.items()}
    assert "block4.1.mlp.dwconv.dwconv.weight" in official and "patch_embed2.proj.weight" in official
    official["head.weight"] = torch.randn(1000, 256)
    official["head.bias"] = torch.randn(1000)
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(official, path)
    b = registry.build("pvt-v2-b0", weights=str(path))
    for k, v in b.body.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the weights change the features (they were really loaded)
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(b.eval()(x)[3], ref.eval()(x)[3])


def test_timm_classifier_layout_loads(tmp_path):
    import timm

    full = timm.create_model("pvt_v2_b0")
    path = tmp_path / "pvt_v2_b0.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    b = registry.build("pvt-v2-b0", weights=str(path)).eval()
    assert torch.equal(b.body.stages_2.blocks[1].attn.q.weight, full.stages[2].blocks[1].attn.q.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = b(x)
        _, theirs = full.eval().forward_intermediates(x)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ref = registry.build("pvt-v2-b0")
    official = {_to_official(k): v for k, v in _random_state(ref).items()}
    del official["block2.0.attn.q.weight"]
    official["block2.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(official, path)
    with pytest.raises(CheckpointError) as info:
        registry.build("pvt-v2-b0", weights=str(path))
    msg = str(info.value)
    assert "stages_1.blocks.0.attn.q.weight" in msg and "stages_1.blocks.0.attn.extra.weight" in msg
    assert "missing" in msg and "unexpected" in msg


def test_wrong_variant_weights_are_a_shape_error(tmp_path):
    b2 = registry.build("pvt-v2-b1")
    path = tmp_path / "b1.pth"
    torch.save(b2.body.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape"):
        registry.build("pvt-v2-b0", weights=str(path))


def test_timm_backbone_still_generic():
    b = registry.build("timm-backbone", model_name="resnet18").eval()
    feats = b(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == b.channels
