"""Tests of the ViT explainers (foveal/plugins/vit_lrp.py).

The float64 reference below is an explicit layer-by-layer relevance propagation of a pre-norm
ViT written from the equations of vit-lrp-affinitynet.txt section 4.2 (alpha1-beta0 for linear
layers, z-rule + two-input normalisation for the residual additions, z-rule halved for the two
attention products, identity for LayerNorm/GELU/softmax, z-rule for the class-token selection
and at the residual forks), with the authors' stabiliser a / (b + 1e-9). It shares no code with
the generic implementation, which installs the rules on timm's modules through autograd.
"""

from __future__ import annotations

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


def lrp_linear(x, w, r):
    """alpha1-beta0: positive contributions z+ = x+ W+ + x- W-."""
    px, nx, pw, nw = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    s = sdiv(r, px @ pw.T + nx @ nw.T)
    return px * (s @ pw) + nx * (s @ nw)


def lrp_add(a, b, r):
    """z-rule, then each share rescaled: |sum Ra| / (|sum Ra| + |sum Rb|) * sum R (per sample)."""
    s = sdiv(r, a + b)
    ra, rb = a * s, b * s
    sa, sb = ra.sum((1, 2), keepdim=True), rb.sum((1, 2), keepdim=True)
    tot = r.sum((1, 2), keepdim=True)
    return (ra * sdiv(sdiv(sa.abs(), sa.abs() + sb.abs()) * tot, sa),
            rb * sdiv(sdiv(sb.abs(), sa.abs() + sb.abs()) * tot, sb))


def explicit(m, x, targets):
    """Forward of a timm ViT written out, then the relevance pass; returns per block the attention
    A, its gradient and its relevance, each (B, heads, N, N)."""
    b = x.shape[0]
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token.expand(b, -1, -1), t], 1) + m.pos_embed
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

    with torch.no_grad():
        r_c = lrp_linear(c, m.head.weight, onehot)
        r = torch.zeros_like(y)
        r[:, 0] = r_c * sdiv(c, c)  # z-rule of the selection y -> y[:, 0]
        rel = []
        for at in reversed(cache):
            blk, attn = at["blk"], at["blk"].attn
            ra, rb = lrp_add(at["t1"], at["f2"], r)  # second residual
            rg = lrp_linear(at["g"], blk.mlp.fc2.weight, rb)
            rh2 = lrp_linear(at["h2"], blk.mlp.fc1.weight, rg)  # GELU identity
            r1 = (ra + rh2) * sdiv(at["t1"], at["t1"])  # fork of t1 (LayerNorm identity)
            ra, rb = lrp_add(at["t0"], at["p"], r1)  # first residual
            rom = lrp_linear(at["om"], attn.proj.weight, rb)
            ro = rom.reshape(*rom.shape[:2], attn.num_heads, -1).transpose(1, 2)
            s = sdiv(ro, at["o"])
            r_att = at["A"] * (s @ at["v"].transpose(-1, -2)) / 2
            r_v = at["v"] * (at["A"].transpose(-1, -2) @ s) / 2
            qk = at["q"] @ at["k"].transpose(-1, -2)  # the stabiliser acts on the unscaled product
            s = sdiv(r_att, qk)  # softmax identity
            r_q = at["q"] * (s @ at["k"]) / 2
            r_k = at["k"] * (s.transpose(-1, -2) @ at["q"]) / 2
            r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(*at["h"].shape[:2], -1)
            rh = lrp_linear(at["h"], attn.qkv.weight, r_qkv)
            r = (ra + rh) * sdiv(at["t0"], at["t0"])
            rel.append(r_att)
    rel.reverse()
    return [at["A"].detach() for at in cache], [at["A"].grad for at in cache], rel


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
    m, x, targets, (att, grads, rel) = setup
    cams = [(g * r).clamp(min=0).mean(1) for g, r in zip(grads, rel)]
    expected = rollout(cams, start)[:, 0, 1:].reshape(2, 4, 4)
    got = attribute("vit-lrp", m, x, targets, start_layer=start)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    # not vacuous: the gradient alone or the relevance alone give other maps
    other = rollout([g.clamp(min=0).mean(1) for g in grads], start)[:, 0, 1:].reshape(2, 4, 4)
    assert not torch.allclose(got / got.amax(), other / other.amax(), atol=1e-3)


def test_baselines_match_their_definitions(setup):
    m, x, targets, (att, grads, rel) = setup

    def grid(t):
        return t.reshape(2, 4, 4)

    torch.testing.assert_close(attribute("raw-attention", m, x, targets), grid(att[-1].mean(1)[:, 0, 1:]))
    torch.testing.assert_close(attribute("attention-rollout", m, x, targets),
                               grid(rollout([a.mean(1) for a in att], normalise=True)[:, 0, 1:]))
    torch.testing.assert_close(attribute("attention-rollout", m, x, targets, start_layer=2),
                               grid(rollout([a.mean(1) for a in att], 2, normalise=True)[:, 0, 1:]))
    w = grads[-1][:, :, 0, 1:].mean(-1, keepdim=True)
    torch.testing.assert_close(attribute("attn-grad-cam", m, x, targets),
                               grid((att[-1][:, :, 0, 1:] * w).mean(1).clamp(min=0)))
    torch.testing.assert_close(attribute("partial-lrp", m, x, targets),
                               grid(rel[-1].clamp(min=0).mean(1)[:, 0, 1:]), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(attribute("raw-attention", m, x, targets, layer=0),
                               grid(att[0].mean(1)[:, 0, 1:]))


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
