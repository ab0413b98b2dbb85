"""RTA-Former: Table I parameter counts, eq. 1-5 building blocks, variants, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from foveal import registry
from foveal.models.rta_former import (
    ConvReverseAttention,
    FastFeatureFusion,
    ResidualRefine,
    ReverseTransformerAttention,
)
from foveal.testing import check_component

TABLE_I = {"t": 8.4, "s": 56.2, "m": 192.6, "l": 250.8}  # millions (rta-former.txt, Table I)


def count(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("size", list(TABLE_I))
def test_parameter_counts_match_table_1(size):
    with torch.device("meta"):  # no memory for the weights, even for B5
        model = registry.build(f"rta-former-{size}")
    n = count(model)
    assert abs(n - TABLE_I[size]) / TABLE_I[size] < 0.02, f"rta-former-{size}: {n:.2f} M vs {TABLE_I[size]} M"
    backbone = {"t": "pvt-v2-b0", "s": "pvt-v2-b2", "m": "pvt-v2-b4", "l": "pvt-v2-b5"}[size]
    assert model.config.backbone == backbone


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return registry.build("rta-former-t").eval()


def test_forward_returns_logits_at_input_size(tiny):
    for shape in [(2, 3, 64, 64), (1, 3, 64, 96), (1, 3, 72, 40)]:
        with torch.no_grad():
            out = tiny(torch.randn(*shape))
        assert out.shape == (shape[0], 1, *shape[2:])
        assert torch.isfinite(out).all()


def test_num_classes_configurable():
    model = registry.build("rta-former-t", num_classes=3, width=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_rta_stages_are_copies_of_the_backbone_stages(tiny):
    stages = tiny.decoder.rta_stages()
    assert [level for level, _ in stages] == [1, 2, 3]  # Stage_{i+1} for X_i, i = 1..3 (0-based levels)
    for level, stage in stages:
        own = stage.stage.state_dict()
        src = tiny.backbone.stage(level).state_dict()
        assert set(own) == {k for k in src if not k.startswith("downsample.")}
        for k, v in own.items():
            assert torch.equal(v, src[k]), k
            assert v.data_ptr() != src[k].data_ptr(), "stage weights must be copies, not shared"


def test_stage_copies_follow_loaded_backbone_weights(tmp_path):
    b = registry.build("pvt-v2-b0")
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) for k, v in b.body.state_dict().items()}
    path = tmp_path / "b0.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    model = registry.build("rta-former-t", backbone_weights=str(path))
    stage = dict(model.decoder.rta_stages())[3]
    assert torch.equal(stage.stage.blocks[0].attn.kv.weight, state["stages_3.blocks.0.attn.kv.weight"])


def test_m_and_l_stack_two_synthesizer_rounds():
    with torch.device("meta"):
        m = registry.build("rta-former-m")
    assert m.config.hfs_depth == 2 and len(m.decoder.rounds) == 2
    assert [lvl for lvl, _ in m.decoder.rta_stages()] == [1, 2, 3, 1, 2, 3]
    assert [len(s.stage.blocks) for _, s in m.decoder.rta_stages()[:3]] == [8, 27, 3]


def test_fast_feature_fusion_eq1():
    ff = FastFeatureFusion(2)
    with torch.no_grad():
        ff.weight.copy_(torch.tensor([3.0, -1.0]))  # negative weights are clipped to 0
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    w = torch.tensor([3.0, 0.0]) / (3.0 + 1e-4)
    expected = (w[0] * a + w[1] * b) * torch.sigmoid(w[0] * a + w[1] * b)
    torch.testing.assert_close(ff([a, b]), expected)
    ff2 = FastFeatureFusion(3)
    assert abs(float(ff2.normalized_weights().detach().sum()) - 1.0) < 1e-3


def test_rta_module_implements_eq2_eq3(tiny):
    rta = tiny.decoder.rounds[0][0]
    assert isinstance(rta, ReverseTransformerAttention)
    x = torch.randn(1, 256, 16, 16)
    g = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        # eq. 2 re-derived step by step
        s = rta.align(g).permute(0, 2, 3, 1)
        s = rta.stage.stage(s)
        s = F.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False)
        reverse = 1 - torch.sigmoid(rta.bottleneck1(s))
        torch.testing.assert_close(rta.reverse_map(x, g), reverse)
        assert reverse.min() >= 0 and reverse.max() <= 1
        # eq. 3
        torch.testing.assert_close(rta(x, g), rta.bottleneck2(x * reverse) + x)


def test_deepest_level_is_self_guided_without_stage(tiny):
    top = tiny.decoder.rounds[0][-1]
    assert isinstance(top, ReverseTransformerAttention) and top.stage is None


@pytest.mark.parametrize("variant,module", [("hfs", ResidualRefine), ("ra", ConvReverseAttention),
                                            ("rta", ReverseTransformerAttention)])
def test_ablation_variants(variant, module):
    model = registry.build("rta-former-t", variant=variant).eval()
    assert all(isinstance(m, module) for m in model.decoder.rounds[0])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_no_hfs_variant_and_size_order():
    sizes = {v: count(registry.build("rta-former-t", variant=v)) for v in ("none", "hfs", "ra", "rta")}
    assert len(registry.build("rta-former-t", variant="none").decoder.rounds) == 0
    assert sizes["none"] < sizes["hfs"] < sizes["ra"] < sizes["rta"]
    # only the RTA variant carries backbone stage copies (about 2.7 M for B0)
    assert sizes["rta"] - sizes["ra"] > 2.5


def test_gradients_reach_every_parameter():
    model = registry.build("rta-former-t", width=32).train()
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


def test_checkpoint_round_trip():
    check_component("rta-former-t", width=32)
    check_component("rta-former-decoder", channels=[16, 32, 48, 64], width=16)


def test_decoder_on_a_generic_timm_backbone():
    model = registry.build("rta-former-t", backbone="timm-backbone",
                           backbone_options={"model_name": "resnet18"}, width=32).eval()
    assert model.decoder.config.channels == [64, 64, 128, 256, 512]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_decoder_component_contract():
    dec = registry.build("rta-former-decoder", channels=[8, 16, 32, 64], width=16, num_classes=2).eval()
    feats = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    with torch.no_grad():
        assert dec(feats, (128, 128)).shape == (1, 2, 128, 128)
    from foveal.core.errors import InputError

    with pytest.raises(InputError, match="feature 1 should be"):
        dec([feats[0], feats[0], feats[2], feats[3]], (128, 128))
    with pytest.raises(InputError, match="4 entries"):
        registry.build("rta-former-decoder", channels=[8, 16, 32, 64], stage_depths=[1, 1])
