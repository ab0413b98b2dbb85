"""Tests of the ViT explainers (foveal/plugins/vit_lrp.py).

The float64 reference below is an explicit layer-by-layer relevance propagation of a pre-norm
ViT written from the equations of vit-lrp-affinitynet.txt section 4.2 (alpha1-beta0 for linear
layers, z-rule + two-input normalisation for the residual additions, z-rule halved for the two
attention products, identity for LayerNorm/GELU/softmax, z-rule for the class-token selection
and at the residual forks), with the authors' stabiliser a / (b + 1e-9). It shares no code with
the generic implementation, which installs the rules on timm's modules through autograd.
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
from foveal.explainers.relevance import ViTExplainer
from foveal.testing import _hook_count, check_component, check_explainer

EPS = 1e-9
NAMES = [n for n in registry.names("explainer") if issubclass(registry.entry(n).cls, ViTExplainer)]


def tiny_vit(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, num_classes=5)
    args.update(kw)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval().to(dtype)
    with torch.no_grad():  # timm initialises biases to 0 and norms to 1: make every term matter
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m


def sdiv(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / (b + EPS))


def lrp_linear(x, w, r, separate=False):
    """alpha1-beta0: positive contributions z+ = x+ W+ + x- W-; ``separate`` (the original rule of
    Chefer et al.'s layers_lrp.Linear): x+ W+ and x- W- normalised apart."""
    px, nx, pw, nw = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    if separate:
        return px * (sdiv(r, px @ pw.T) @ pw) + nx * (sdiv(r, nx @ nw.T) @ nw)
    s = sdiv(r, px @ pw.T + nx @ nw.T)
    return px * (s @ pw) + nx * (s @ nw)


def lrp_add(a, b, r, normalise=True):
    """z-rule, then (Chefer's rule, not the original one) each share rescaled:
    |sum Ra| / (|sum Ra| + |sum Rb|) * sum R (per sample)."""
    s = sdiv(r, a + b)
    ra, rb = a * s, b * s
    if not normalise:
        return ra, rb
    sa, sb = ra.sum((1, 2), keepdim=True), rb.sum((1, 2), keepdim=True)
    tot = r.sum((1, 2), keepdim=True)
    return (ra * sdiv(sdiv(sa.abs(), sa.abs() + sb.abs()) * tot, sa),
            rb * sdiv(sdiv(sb.abs(), sa.abs() + sb.abs()) * tot, sb))


def lrp_patch_conv(x, conv, r):
    """z^B rule of Chefer's Conv2d.relprop on 3-channel input: bounds = per-image min / max."""
    low = x.amin((1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax((1, 2, 3), keepdim=True).expand_as(x)
    w, stride = conv.weight, conv.stride
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    z = F.conv2d(x, w, stride=stride) - F.conv2d(low, pw, stride=stride) - F.conv2d(high, nw, stride=stride)
    s = sdiv(r, z)

    def back(t):
        return F.conv_transpose2d(s, t, stride=stride)

    return x * back(w) - low * back(pw) - high * back(nw)


def explicit(m, x, targets, rules="chefer", scale_by_logit=False):
    """Forward of a timm ViT written out, then the relevance pass with Chefer's rules (``"chefer"``)
    or the original LRP rules of their baselines (``"orig"``: no normalisation of additions, alpha-
    beta normalised per sign); returns per block the attention A, its gradient and its relevance,
    each (B, heads, N, N), and the relevance of the pixels (B, 3, H, W) (their "full" LRP).
    Relevance starts at the one-hot target (the authors' relprop), or at the target logit
    (``scale_by_logit``, as ``lrp``: the normalisation's stabiliser makes this differ by more
    than rounding from scaling afterwards)."""
    orig = rules == "orig"
    b = x.shape[0]
    patches = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    cat = torch.cat([m.cls_token.expand(b, -1, -1), patches], 1)
    t = cat + m.pos_embed
    cache = []
    for blk in m.blocks:
        a, at = blk.attn, {}
        h = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = F.linear(h, a.qkv.weight, a.qkv.bias)
        n, hd = t.shape[1], a.head_dim
        q, k, v = qkv.reshape(b, n, 3, a.num_heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-1, -2)) * a.scale, -1)
        att.retain_grad()
        o = att @ v
        om = o.transpose(1, 2).reshape(b, n, -1)
        p = F.linear(om, a.proj.weight, a.proj.bias)
        t1 = t + p
        h2 = F.layer_norm(t1, (t1.shape[-1],), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        f1 = F.linear(h2, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        g = F.gelu(f1)
        f2 = F.linear(g, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        t2 = t1 + f2
        at.update(t0=t, h=h, q=q, k=k, v=v, A=att, o=o, om=om, p=p, t1=t1, h2=h2, g=g, f2=f2, t2=t2, blk=blk)
        cache.append(at)
        t = t2
    y = F.layer_norm(t, (t.shape[-1],), m.norm.weight, m.norm.bias, m.norm.eps)
    c = y[:, 0]
    logits = F.linear(c, m.head.weight, m.head.bias)
    onehot = F.one_hot(torch.tensor(targets), logits.shape[1]).to(x.dtype)
    (logits * onehot).sum().backward()
    if scale_by_logit:
        onehot = onehot * logits.detach()

    with torch.no_grad():
        r_c = lrp_linear(c, m.head.weight, onehot, orig)
        r = torch.zeros_like(y)
        r[:, 0] = r_c * sdiv(c, c)  # z-rule of the selection y -> y[:, 0]
        rel = []
        for at in reversed(cache):
            blk, attn = at["blk"], at["blk"].attn
            ra, rb = lrp_add(at["t1"], at["f2"], r, not orig)  # second residual
            rg = lrp_linear(at["g"], blk.mlp.fc2.weight, rb, orig)
            rh2 = lrp_linear(at["h2"], blk.mlp.fc1.weight, rg, orig)  # GELU identity
            r1 = (ra + rh2) * sdiv(at["t1"], at["t1"])  # fork of t1 (LayerNorm identity)
            ra, rb = lrp_add(at["t0"], at["p"], r1, not orig)  # first residual
            rom = lrp_linear(at["om"], attn.proj.weight, rb, orig)
            ro = rom.reshape(*rom.shape[:2], attn.num_heads, -1).transpose(1, 2)
            s = sdiv(ro, at["o"])
            r_att = at["A"] * (s @ at["v"].transpose(-1, -2)) / 2
            r_v = at["v"] * (at["A"].transpose(-1, -2) @ s) / 2
            qk = at["q"] @ at["k"].transpose(-1, -2)  # the stabiliser acts on the unscaled product
            s = sdiv(r_att, qk)  # softmax identity
            r_q = at["q"] * (s @ at["k"]) / 2
            r_k = at["k"] * (s.transpose(-1, -2) @ at["q"]) / 2
            r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(*at["h"].shape[:2], -1)
            rh = lrp_linear(at["h"], attn.qkv.weight, r_qkv, orig)
            r = (ra + rh) * sdiv(at["t0"], at["t0"])
            rel.append(r_att)
        r_cat, _ = lrp_add(cat, m.pos_embed.expand_as(cat), r, not orig)  # position embedding
        n = m.patch_embed.grid_size
        r_patches = r_cat[:, 1:].transpose(1, 2).reshape(b, -1, *n)  # the class token keeps its share
        r_pixels = lrp_patch_conv(x, m.patch_embed.proj, r_patches)
    rel.reverse()
    return [at["A"].detach() for at in cache], [at["A"].grad for at in cache], rel, r_pixels


def attribute(name, m, x, targets=None, **kw):
    hooks: list = []
    try:
        return registry.build(name, **kw).attribute(m, x, targets, hooks)
    finally:
        for h in hooks:
            h.remove()


def rollout(layers, start=0, normalise=False):
    joint = None
    for a in layers[start:]:
        a = a + torch.eye(a.shape[-1], dtype=a.dtype)
        if normalise:
            a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint


@pytest.fixture(scope="module")
def setup():
    m = tiny_vit()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = [1, 3]
    return m, x, targets, explicit(m, x, targets)


@pytest.mark.parametrize("start", [0, 1])
def test_transformer_attribution_matches_layerwise_derivation(setup, start):
    m, x, targets, (att, grads, rel, _) = setup
    cams = [(g * r).clamp(min=0).mean(1) for g, r in zip(grads, rel)]
    expected = rollout(cams, start)[:, 0, 1:].reshape(2, 4, 4)
    got = attribute("vit-lrp", m, x, targets, start_layer=start)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    # not vacuous: the gradient alone or the relevance alone give other maps
    other = rollout([g.clamp(min=0).mean(1) for g in grads], start)[:, 0, 1:].reshape(2, 4, 4)
    assert not torch.allclose(got / got.amax(), other / other.amax(), atol=1e-3)


def test_baselines_match_their_definitions(setup):
    m, x, targets, (att, grads, rel, _) = setup

    def grid(t):
        return t.reshape(2, 4, 4)

    torch.testing.assert_close(attribute("raw-attention", m, x, targets), grid(att[-1].mean(1)[:, 0, 1:]))
    torch.testing.assert_close(attribute("attention-rollout", m, x, targets, start_layer=0),
                               grid(rollout([a.mean(1) for a in att], normalise=True)[:, 0, 1:]))
    torch.testing.assert_close(attribute("attention-rollout", m, x, targets, start_layer=2),
                               grid(rollout([a.mean(1) for a in att], 2, normalise=True)[:, 0, 1:]))
    w = grads[-1][:, :, 0, 1:].mean(-1, keepdim=True)
    torch.testing.assert_close(attribute("attn-grad-cam", m, x, targets),
                               grid((att[-1][:, :, 0, 1:] * w).mean(1).clamp(min=0)))
    torch.testing.assert_close(attribute("raw-attention", m, x, targets, layer=0),
                               grid(att[0].mean(1)[:, 0, 1:]))


def test_start_layer_defaults_to_the_authors_scripts(setup):
    """Issue 15: Tables 2/3 come from generate_LRP(..., start_layer=1) and
    generate_rollout(..., start_layer=1) (baselines/ViT/generate_visualizations.py,
    imagenet_seg_eval.py)."""
    m, x, targets, (att, grads, rel, _) = setup
    cams = [(g * r).clamp(min=0).mean(1) for g, r in zip(grads, rel)]
    torch.testing.assert_close(attribute("vit-lrp", m, x, targets), rollout(cams, 1)[:, 0, 1:].reshape(2, 4, 4),
                               rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(attribute("attention-rollout", m, x, targets),
                               rollout([a.mean(1) for a in att], 1, normalise=True)[:, 0, 1:].reshape(2, 4, 4))
    one_block = tiny_vit(depth=1)  # no block 1: the default starts at 0 there
    x1 = x[:1]
    for name in ("vit-lrp", "attention-rollout"):
        torch.testing.assert_close(attribute(name, one_block, x1, 1), attribute(name, one_block, x1, 1, start_layer=0))


def test_partial_lrp_uses_the_original_lrp_rules(setup):
    """Issue 15: the "partial LRP" column is run on ViT_orig_LRP (modules/layers_lrp.py): additions
    without the normalisation, alpha-beta normalised per sign, not Chefer's rules."""
    m, x, targets, (_, _, rel_chefer, _) = setup
    _, _, rel, _ = explicit(m, x, targets, "orig")
    expected = rel[-1].clamp(min=0).mean(1)[:, 0, 1:].reshape(2, 4, 4)
    got = attribute("partial-lrp", m, x, targets)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    chefer = rel_chefer[-1].clamp(min=0).mean(1)[:, 0, 1:].reshape(2, 4, 4)
    assert not torch.allclose(got / got.amax(), chefer / chefer.amax(), atol=1e-3)


@pytest.mark.parametrize("rules", ["chefer", "orig"])
def test_lrp_to_the_pixels_matches_layerwise_derivation(setup, rules):
    """``lrp`` with rules=chefer / orig-lrp on a plain ViT is Chefer et al.'s "full" LRP (their
    relprop(method="full") on ViT_LRP / ViT_orig_LRP; the latter is the "LRP" column of Tables
    2/3): the block relevances of vit-lrp / partial-lrp, then the position-embedding addition, the
    class token dropped and z^B on the patch embedding."""
    m, x, targets, _ = setup
    expected = explicit(m, x, targets, rules, scale_by_logit=True)[3]
    hooks: list = []
    got = registry.build("lrp", rules="chefer" if rules == "chefer" else "orig-lrp").relevance(m, x, targets, hooks)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_images_one_by_one(name):
    m = tiny_vit(seed=2)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = [0, 4, 2]
    batch = attribute(name, m, x, targets)
    for i in range(3):
        alone = attribute(name, m, x[i : i + 1], [targets[i]])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_contract_and_model_left_as_found(name):
    m = tiny_vit(torch.float32, seed=4)
    m.blocks[1].train()  # a mixed train/eval state must survive
    m.head.weight.requires_grad_(False)
    m.head.bias.grad = torch.ones_like(m.head.bias)
    flags = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
    for i, mod in enumerate(flags):
        mod.fused_attn = bool(i % 2)
    before = [mod.fused_attn for mod in flags]
    x = torch.randn(2, 3, 32, 32)
    maps = check_explainer(registry.build(name), m, x, [1, 2])
    assert [mod.fused_attn for mod in flags] == before
    assert maps.shape == (2, 32, 32) and float(maps.amax()) == pytest.approx(1.0)
    check_component(name)


def test_state_restored_when_the_call_fails():
    m = tiny_vit(torch.float32)
    flags = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
    for mod in flags:
        mod.fused_attn = True
    hooks = _hook_count(m)
    with pytest.raises(InputError, match="out of range"):
        registry.build("vit-lrp").explain(m, torch.randn(1, 3, 32, 32), 99)  # fails after the forward
    assert all(mod.fused_attn for mod in flags) and _hook_count(m) == hooks
    assert all(p.grad is None for p in m.parameters())


def test_hybrid_and_prefix_tokens():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, num_classes=3).eval()
    maps = check_explainer(registry.build("vit-lrp"), deit, torch.randn(2, 3, 32, 32), [0, 2])
    assert maps.shape == (2, 32, 32)
    hybrid = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=64, depth=2,
                               num_classes=3).eval()
    assert registry.build("vit-lrp").attribute(hybrid, torch.randn(1, 3, 64, 64), 1, []).shape == (1, 2, 2)
    registry.build("vit-lrp").explain(hybrid, torch.randn(1, 3, 64, 64), 1)


def test_layer_scale_and_no_unknown_ops(recwarn):
    m = tiny_vit(torch.float64, init_values=0.5, qk_norm=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    got = attribute("vit-lrp", m, x, 2)
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    assert not [w for w in recwarn if "vit-lrp" in str(w.message)]


def test_clear_errors():
    e = registry.build("vit-lrp")
    with pytest.raises(InputError, match="no `blocks`"):
        e.explain(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(128, 2)), torch.randn(1, 3, 8, 8))
    no_cls = tiny_vit(torch.float32, class_token=False, global_pool="avg")
    with pytest.raises(InputError, match="class token"):
        e.explain(no_cls, torch.randn(1, 3, 32, 32))
    with pytest.raises(InputError, match="start_layer"):
        registry.build("vit-lrp", start_layer=7).explain(tiny_vit(torch.float32), torch.randn(1, 3, 32, 32))

    class SDPAttention(nn.Module):  # no fused_attn flag to switch off
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(24, 72)

        def forward(self, x, **kwargs):
            q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, 3, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)

    m = tiny_vit(torch.float32)
    for blk in m.blocks:
        blk.attn = SDPAttention()
    hooks = _hook_count(m)
    with pytest.raises(InputError, match="scaled_dot_product_attention"):
        e.explain(m, torch.randn(1, 3, 32, 32))
    assert _hook_count(m) == hooks


@pytest.mark.parametrize("names", [("vit-lrp", "partial-lrp"), ("attn-grad-cam", "attention-rollout")])
def test_two_hundred_explains_leave_no_growth(names):
    """Issue 17: every vit-lrp / partial-lrp call leaked its graph (a saved output held by the
    tracer's node formed a cycle through autograd that gc cannot free)."""
    m = tiny_vit(torch.float32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    explainers = [registry.build(n) for n in names]
    for e in explainers:  # warm-up
        e.explain(m, x, [1, 2])
    gc.collect()
    objects_before = len(gc.get_objects())
    tensors_before = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    for i in range(200):
        maps = explainers[i % 2].explain(m, x, [1, 2])
    del maps
    gc.collect()
    tensors_after = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    assert _hook_count(m) == 0
    assert tensors_after <= tensors_before, f"{tensors_after - tensors_before} tensors survive 200 explains"
    assert len(gc.get_objects()) - objects_before < 100, "python objects accumulate over 200 explains"


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_caller_gets_the_same_maps(name):
    """Issue 17: the gradient-based ViT explainers failed under torch.no_grad()."""
    m = tiny_vit(seed=5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = registry.build(name).explain(m, x, [1, 2])
    with torch.no_grad():
        got = registry.build(name).explain(m, x, [1, 2])
    assert torch.equal(got, expected)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ["vit-lrp", "partial-lrp", "attn-grad-cam"])
def test_inference_mode_gives_the_same_maps(name):
    """Explainer.explain leaves inference mode for the call and clones inference-mode images
    (branch robust, issue 17 item 5), so these work there too, with the same maps."""
    m = tiny_vit(torch.float32)
    hooks = _hook_count(m)
    x = torch.randn(1, 3, 32, 32)
    expected = registry.build(name).explain(m, x, 1)
    with torch.inference_mode():
        assert torch.equal(registry.build(name).explain(m, x, 1), expected)
        frozen = x.clone()
    assert torch.equal(registry.build(name).explain(m, frozen, 1), expected)
    assert _hook_count(m) == hooks
    # the gradient-free baselines work in inference mode
    with torch.inference_mode():
        assert registry.build("attention-rollout").explain(m, torch.randn(1, 3, 32, 32)).shape == (1, 32, 32)
