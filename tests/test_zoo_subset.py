"""A dozen real timm architectures across families (issue 5's test subset of bench/zoo.py).

Analysis runs on the meta device (no weights, no compute); rewrite equivalence runs with real
random weights on the smallest few only, to keep the file fast."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import mixfx  # noqa: E402


def _build(name: str, meta: bool = True, **kw) -> torch.nn.Module:
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        m = timm.create_model(name, pretrained=False, **kw)
    return m.eval()


def _shape(m) -> tuple[int, ...]:
    cfg = getattr(m, "pretrained_cfg", None) or {}
    return (1, *(cfg.get("input_size") or (3, 224, 224)))


_CACHE: dict = {}


def _analyse(name: str, **kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in _CACHE:
        m = _build(name, **kw)
        _CACHE[key] = mixfx.analyze(m, torch.empty(_shape(m), device="meta"), name=name)
    return _CACHE[key]


CONVOLUTIONAL = ["resnet10t", "efficientnet_b0", "convnext_atto", "regnetx_002", "convmixer_768_32", "poolformerv2_s12"]


@pytest.mark.parametrize("name", CONVOLUTIONAL)
def test_convolutional(name):
    r = _analyse(name)
    assert r.classification == "convolutional", (r.classification, [(x.module, x.op) for x in r.rigid_nodes])
    assert not r.rigid_nodes
    assert r.head is not None


def _rigid(r):
    return [(x.module, x.op, x.kind) for x in r.rigid_nodes]


@pytest.mark.parametrize("name,stem,structural", [
    ("mixer_s16_224", "stem", "blocks.0.mlp_tokens.fc1"),
    ("resmlp_12_224", "stem", "blocks.0.linear_tokens"),
    ("gmlp_ti16_224", "stem", "blocks.0.mlp_channels.gate.proj"),
    ("vit_tiny_patch16_224", "patch_embed", "pos_embed"),
    ("deit_tiny_patch16_224", "patch_embed", "pos_embed"),
])
def test_fixed_with_guarded_and_structural_rigid_nodes(name, stem, structural):
    r = _analyse(name)
    assert r.classification == "fixed"
    rigid = _rigid(r)
    # the PatchEmbed size assert, reported as guarded ...
    assert any(mod == stem and kind == "guarded" for mod, _, kind in rigid), rigid
    # ... and, past it, the structural cause (token-mixing Linear / fixed position embedding)
    assert any(mod == structural and kind == "structural" for mod, _, kind in rigid), rigid


def test_vit_dynamic_img_size_is_polymorphic():
    r = _analyse("vit_tiny_patch16_224", dynamic_img_size=True)
    assert r.classification == "polymorphic"
    assert not r.rigid_nodes


def test_vit_dynamic_img_size_branch_is_explained():
    """`resample_abs_pos_embed` returns early when the grid has the default size: symbolically that
    pins H and W, but the model runs at other sizes. The report explains the branch instead of
    listing it as an unexplained symbolic/concrete disagreement."""
    r = _analyse("vit_tiny_patch16_224", dynamic_img_size=True)
    assert not r.disagreements, r.disagreements
    assert any("resample_abs_pos_embed" in n and "branches on" in n for n in r.notes), r.notes
    assert r.constraints == ["H % 16 == 0", "W % 16 == 0"]


@pytest.mark.parametrize("name,rigid", [
    # the strict PatchEmbed size assert; the shifted-window mask's view(-1, 64, ...) asks only for
    # a count of windows divisible by 64 (448x448 runs once the assert is gone), so it is no pin
    ("swin_tiny_patch4_window7_224", [("patch_embed", "assert", "guarded")]),
    # relative position bias tables sized for the default 14x14 and 7x7 grids
    ("coatnet_nano_rw_224", [("stages.2.blocks.0.attn", "scaled_dot_product_attention", "structural"),
                             ("stages.3.blocks.0.attn", "scaled_dot_product_attention", "structural")]),
])
def test_windowed_attention_models_fixed(name, rigid):
    r = _analyse(name)
    assert r.classification == "fixed"
    # the first causes, in order; how many more the budget-limited symbolic run reaches varies
    assert _rigid(r)[:len(rigid)] == rigid


@pytest.mark.parametrize("name,to", [
    ("regnetx_002", "conv"), ("regnetx_002", "linear"), ("convnext_atto", "conv"), ("convnext_atto", "linear"),
    ("vit_tiny_patch16_224", "conv"), ("vit_tiny_patch16_224", "linear"),
])
def test_rewrite_equivalence(name, to):
    torch.manual_seed(0)
    m = _build(name, meta=False)
    x = torch.randn(_shape(m))
    try:
        res = mixfx.rewrite(m, to=to, example_input=x, analyze=False)
    except mixfx.errors.VerificationError as exc:  # a caught mismatch is a failure of the pass
        pytest.fail(f"rewrite --to {to} not equivalent: {exc}")
    assert res.verification.passed
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), m(x), atol=1e-4, rtol=1e-4)
