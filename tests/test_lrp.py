"""Tests of ``lrp`` (foveal/explainers/lrp.py): relevance to the pixels of any model.

Oracles: LXT's own rule functions (``lxt.explicit``, the reference implementation of Achtibat et
al.'s AttnLRP) composed by hand into a tiny ViT and a small CNN, in float64; conservation where
it must hold (docs/lrp.md says which rule set conserves on which model); Chefer's rules to the
pixels are re-derived in tests/test_vit_lrp.py.
"""

from __future__ import annotations

import gc

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from foveal import registry
from foveal.core.errors import InputError
from foveal.core.explainer import SegmentationTarget
from foveal.core.modules import preserved_model_state
from foveal.testing import _hook_count, check_component, check_explainer

from .test_vit_lrp import tiny_vit

RULES = ["attnlrp", "cp-lrp", "chefer", "orig-lrp"]


def relevance(model, x, targets, **kw):
    with preserved_model_state(model) as hooks:
        return registry.build("lrp", **kw).relevance(model, x, targets, hooks)


def zero_biases(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or n.endswith("pos_embed"):
                p.zero_()
    return model


def tiny_swin(dtype=torch.float64, **kw):
    args = dict(img_size=56, window_size=7, embed_dim=12, depths=(2, 1), num_heads=(1, 2), num_classes=5)
    args.update(kw)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval().to(dtype)


def tiny_pvt(dtype=torch.float64, **kw):
    args = dict(depths=(1, 1, 1, 1), num_classes=5)
    args.update(kw)
    return timm.create_model("pvt_v2_b0", pretrained=False, **args).eval().to(dtype)


def tiny_rta(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = registry.build("rta-former-t", width=8, **kw).eval().to(dtype)
    with torch.no_grad():  # BatchNorm statistics that make every term matter
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    return m


# --- LXT as the oracle of the AttnLRP / CP-LRP rules ---------------------------------------------

def lxt_vit(m, x, targets, eps, cp=False):
    """A timm ViT's forward written with LXT's explicit rule functions (lxt/explicit/functional.py
    and rules.py); backward from the target logits gives AttnLRP's input relevance. ``cp``: the
    attention probabilities are constants and ``A @ v`` is an epsilon-rule linear map of v."""
    lf = pytest.importorskip("lxt.explicit.functional")
    lr = pytest.importorskip("lxt.explicit.rules")

    def norm(t, ln):
        return lf.layer_norm_grad_fn.apply(t, ln.weight.detach(), ln.bias.detach(), ln.eps, eps)

    def linear(t, lin):
        return lf.linear_epsilon(t, lin.weight.detach(), lin.bias.detach(), eps)

    x = x.clone().requires_grad_(True)
    b, pe = x.shape[0], m.patch_embed.proj
    t = lr.epsilon_lrp(lambda u: F.conv2d(u, pe.weight.detach(), pe.bias.detach(), stride=pe.stride), eps, x)
    t = torch.cat([m.cls_token.detach().expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t = lf.add2(t, m.pos_embed.detach().expand_as(t), epsilon=eps)
    n = t.shape[1]
    for blk in m.blocks:
        a = blk.attn
        qkv = linear(norm(t, blk.norm1), a.qkv)
        q, k, v = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = lr.identity(lambda u, s=a.scale: u * s, q)
        logits = lf.matmul(q, k.transpose(-1, -2), epsilon=eps)
        if cp:
            att = torch.softmax(logits, -1).detach()
            o = lr.epsilon_lrp(lambda u, att=att: att @ u, eps, v)
        else:
            o = lf.matmul(lf.softmax(logits, -1), v, epsilon=eps)
        t = lf.add2(t, linear(o.transpose(1, 2).reshape(b, n, -1), a.proj), epsilon=eps)
        f = linear(lr.identity(F.gelu, linear(norm(t, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2)
        t = lf.add2(t, f, epsilon=eps)
    out = linear(norm(t, m.norm)[:, 0], m.head)
    seed = F.one_hot(torch.tensor(targets), out.shape[1]).to(out.dtype) * out.detach()
    out.backward(seed)
    return x.grad


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_attnlrp_equals_lxt_on_a_tiny_vit(rules):
    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = lxt_vit(m, x, [1, 3], eps=1e-12, cp=rules == "cp-lrp")
    got = relevance(m, x, [1, 3], rules=rules, eps=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    # not vacuous: the two attention rules differ, and the gradient x input is another map
    other = relevance(m, x, [1, 3], rules="cp-lrp" if rules == "attnlrp" else "attnlrp", eps=1e-12)
    assert (other - got).abs().max() > 1e-3 * got.abs().max()


class TinySegmenter(nn.Module):
    """Convolutions with biases, BatchNorm with running statistics, ReLU, max/avg pooling,
    bilinear up-sampling and a concatenation: the decoder operations of RTA-Former."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(14, 2, 1)

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)), inplace=True)
        b = F.relu(self.b2(self.c2(F.max_pool2d(a, 2) + F.avg_pool2d(a, 2))))
        up = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([a, up], 1))


def test_attnlrp_equals_lxt_on_a_conv_segmenter_with_folded_batchnorm():
    """Epsilon rule on conv then BatchNorm = epsilon rule on the folded conv-BN (LXT's generic
    epsilon_lrp over the composed function); pooling and interpolation by the epsilon rule."""
    lf = pytest.importorskip("lxt.explicit.functional")
    lr = pytest.importorskip("lxt.explicit.rules")
    torch.manual_seed(0)
    m = TinySegmenter().double().eval()
    with torch.no_grad():
        for bn in (m.b1, m.b2):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eps = 1e-12
    target = SegmentationTarget(1, mask=(torch.rand(16, 16) > 0.5).double())

    xr = x.clone().requires_grad_(True)
    a = lr.identity(F.relu, lr.epsilon_lrp(lambda u: m.b1(m.c1(u)), eps, xr))
    pooled = lr.epsilon_lrp(lambda u: F.max_pool2d(u, 2), eps, a)  # a is used three times: relevances add
    p2 = lr.epsilon_lrp(lambda u: F.avg_pool2d(u, 2), eps, a)
    # LXT's add2, not epsilon_lrp(lambda u, v: u + v): for an addition autograd hands epsilon_lrp
    # one gradient tensor for both operands, which it multiplies in place by each (lxt 2.1)
    s = lf.add2(pooled, p2, epsilon=eps)
    b = lr.identity(F.relu, lr.epsilon_lrp(lambda u: m.b2(m.c2(u)), eps, s))
    up = lr.epsilon_lrp(lambda u: F.interpolate(u, size=(16, 16), mode="bilinear", align_corners=False), eps, b)
    out = lr.epsilon_lrp(m.head, eps, torch.cat([a, up], 1))
    score = target(out)
    (g,) = torch.autograd.grad(score.sum(), out, retain_graph=True)
    out.backward(g * out.detach())
    got = relevance(m, x, target, rules="attnlrp", eps=eps)
    assert xr.grad.abs().amin(dim=(1, 2, 3)).gt(0).all()
    torch.testing.assert_close(got, xr.grad, rtol=1e-8, atol=1e-10 * float(xr.grad.abs().max()))
    # BatchNorm by the identity rule (chefer) gives another map
    assert (relevance(m, x, target, rules="chefer") - got).abs().max() > 1e-3 * got.abs().max()


# --- conservation --------------------------------------------------------------------------------

def scores_of(model, x, targets):
    with torch.no_grad():
        out = model(x)
    if isinstance(targets, SegmentationTarget):
        return targets(out)
    return out[torch.arange(len(targets)), targets]


def test_cp_lrp_conserves_on_bias_free_transformers_and_segmenter():
    """CP-LRP (epsilon everywhere, attention constant) gives sum R_input = score on models without
    biases or added constants: a ViT without class token, Swin (shifted windows, relative position
    bias and mask enter only the constant attention), PVTv2 (spatial-reduction attention) and
    RTA-Former without reverse attention's ``1 - sigmoid`` (variant "hfs")."""
    cases = [
        (zero_biases(tiny_vit(class_token=False, global_pool="avg", depth=2)), 32, [1, 3]),
        (zero_biases(tiny_swin()), 56, [0, 4]),
        (zero_biases(tiny_pvt()), 64, [2, 1]),
    ]
    for model, size, targets in cases:
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        total = relevance(model, x, targets, rules="cp-lrp", eps=1e-12).sum((1, 2, 3))
        torch.testing.assert_close(total, scores_of(model, x, targets), rtol=1e-7, atol=0)
    rta = zero_biases(tiny_rta(variant="hfs"))
    with torch.no_grad():
        for mod in rta.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.zero_()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    target = SegmentationTarget(0, mask=(torch.rand(64, 64) > 0.5).double())
    total = relevance(rta, x, target, rules="cp-lrp", eps=1e-12).sum((1, 2, 3))
    torch.testing.assert_close(total, scores_of(rta, x, target), rtol=1e-7, atol=0)


def test_conservation_per_rule_set_on_a_vit_with_biases():
    """With biases: chefer still conserves (alpha1-beta0 leaves biases out, the normalised
    additions keep the total); the epsilon rule sets do not (biases absorb relevance); orig-lrp's
    separately normalised alpha-beta rule roughly doubles the relevance at every linear layer."""
    m = tiny_vit(class_token=False, global_pool="avg", depth=2)
    with torch.no_grad():
        m.pos_embed.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    score = scores_of(m, x, [1, 3])
    total = {r: relevance(m, x, [1, 3], rules=r).sum((1, 2, 3)) for r in RULES}
    torch.testing.assert_close(total["chefer"], score, rtol=1e-6, atol=0)
    for r in ("attnlrp", "cp-lrp"):
        assert ((total[r] - score).abs() > 1e-3 * score.abs()).all(), r
    assert (total["orig-lrp"].abs() > 2 * score.abs()).all()


# --- models beyond the plain ViT ----------------------------------------------------------------

@pytest.mark.parametrize("rules", RULES)
def test_swin_pvt_batch_equals_images_one_by_one(rules, recwarn):
    for model, size in ((tiny_swin(), 56), (tiny_pvt(), 64)):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        batch = relevance(model, x, [0, 4], rules=rules)
        for i in range(2):
            alone = relevance(model, x[i : i + 1], [[0, 4][i]], rules=rules)
            torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-9, atol=1e-12 * float(alone.abs().max()))
        assert batch.abs().sum() > 0
    assert not [w for w in recwarn if "no relevance rule" in str(w.message)], "an op fell back to its gradient"


def test_rta_former_segmentation_target():
    """The issue's call: registry.build("lrp").explain(rta_former, images, SegmentationTarget(0))."""
    rta = tiny_rta(torch.float32)
    x = torch.randn(2, 3, 64, 64)
    maps = check_explainer(registry.build("lrp"), rta, x, SegmentationTarget(0))
    assert maps.shape == (2, 64, 64) and float(maps.amax()) == pytest.approx(1.0)
    for rules in ("chefer", "cp-lrp"):  # every rule set runs through conv, BN, interpolation, RTA
        r = relevance(rta, x[:1], SegmentationTarget(0), rules=rules)
        assert torch.isfinite(r).all() and r.abs().sum() > 0


def test_sign_options_and_contract():
    m = tiny_vit(torch.float32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    signed = relevance(m, x, [1, 2]).sum(1)
    hooks: list = []
    for sign, expected in (("positive", signed.clamp(min=0)), ("absolute", signed.abs()), ("signed", signed)):
        got = registry.build("lrp", sign=sign).attribute(m, x, [1, 2], hooks)
        torch.testing.assert_close(got, expected)
    flags = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
    for mod in flags:
        mod.fused_attn = True
    for rules in RULES:
        check_explainer(registry.build("lrp", rules=rules), m, x, [1, 2])
    assert all(mod.fused_attn for mod in flags)
    check_component("lrp")
    check_component("lrp", rules="chefer", sign="positive", eps=1e-7)


def test_no_grad_inference_mode_and_errors():
    m = tiny_vit(torch.float32, depth=1)
    x = torch.randn(1, 3, 32, 32)
    expected = registry.build("lrp").explain(m, x, 1)
    with torch.no_grad():
        assert torch.equal(registry.build("lrp").explain(m, x, 1), expected)
    with torch.inference_mode():  # explain() leaves inference mode for the call (branch robust)
        assert torch.equal(registry.build("lrp").explain(m, x, 1), expected)
    with pytest.raises(Exception, match="rules"):
        registry.build("lrp", rules="gamma")

    class Detached(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3)

    with pytest.raises(InputError, match="computed from the images"):
        registry.build("lrp").explain(Detached(), x, 1)
    assert _hook_count(m) == 0


def test_two_hundred_explains_leave_no_growth():
    m = tiny_vit(torch.float32, depth=1)
    x = torch.randn(1, 3, 32, 32)
    explainers = [registry.build("lrp"), registry.build("lrp", rules="chefer")]
    for e in explainers:
        e.explain(m, x, 1)
    gc.collect()
    objects_before = len(gc.get_objects())
    tensors_before = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    for i in range(200):
        maps = explainers[i % 2].explain(m, x, 1)
    del maps
    gc.collect()
    assert sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) <= tensors_before
    assert len(gc.get_objects()) - objects_before < 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rules", RULES)
def test_lrp_on_cuda_equals_cpu(rules):
    """Every rule on a CUDA model (convolutions, shifted windows, norms) gives the CPU's relevance."""
    model, x = tiny_swin(), torch.randn(2, 3, 56, 56, dtype=torch.float64)
    cpu = relevance(model, x, [1, 2], rules=rules)
    cuda = relevance(model.cuda(), x.cuda(), [1, 2], rules=rules)
    model.cpu()
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-7, atol=1e-9 * float(cpu.abs().max()))


def test_in_place_updates_are_traced_out_of_place_and_a_discarded_one_is_an_error():
    """``x += y`` rebinds ``x`` to the traced result (ResNet shortcuts); a bare ``x.add_(y)`` whose
    result is dropped would lose the update, so the stale ``x`` is refused at its next use."""

    class Residual(torch.nn.Module):
        def __init__(self, discard: bool) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.head = torch.nn.Linear(3, 2)
            self.discard = discard

        def forward(self, x):
            y = self.conv(x)
            if self.discard:
                y.add_(x)
            else:
                y += x
            return self.head(y.mean((2, 3)))

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kept = Residual(discard=False).eval()
    out_of_place = registry.build("lrp", rules="cp-lrp").relevance(kept, x, [0, 1])
    plain = Residual(discard=False).eval()
    plain.load_state_dict(kept.state_dict())
    plain.forward = lambda t: plain.head((plain.conv(t) + t).mean((2, 3)))
    assert torch.allclose(out_of_place, registry.build("lrp", rules="cp-lrp").relevance(plain, x, [0, 1]))
    dropped = Residual(discard=True).eval()
    dropped.load_state_dict(kept.state_dict())
    with pytest.raises(InputError, match="updated in place"):
        registry.build("lrp").explain(dropped, x, [0, 1])
