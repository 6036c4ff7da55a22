"""Rewrites on timm's own models (random weights, reduced depth, no downloads)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mixfx.rewrite import rewrite  # noqa: E402
from passes import _fxutil as fu  # noqa: E402

pytestmark = pytest.mark.timm


def _randomise(model: nn.Module) -> nn.Module:
    """timm zero-initialises some heads (Mixer): outputs of all zeros would prove nothing."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _linears(gm, prefix=""):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(prefix)
            and isinstance(gm.get_submodule(n.target), nn.Linear)]


def _check_roundtrip(model, x, res):
    back = rewrite(res.module, "linear", x, only="dense", analyze=False)
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), model(x), atol=1e-4, rtol=1e-4)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            assert isinstance(back.module.get_submodule(name), nn.Linear), name


def test_convnext_atto_to_conv_has_no_linear_or_permute_in_stages():
    model = _randomise(timm.create_model("convnext_atto", pretrained=False, conv_mlp=False, num_classes=10))
    x = torch.randn(1, 3, 64, 96)
    # classification invariance on ConvNeXt is covered on the bundled example (test_rewrite_api);
    # the analyser is the slow part here
    res = rewrite(model, "conv", x, analyze=False)
    assert res.verification.passed and len(res.verification.sizes) == 2
    gm = res.module
    assert _linears(gm, "stages") == []
    shapes = fu.propagate_shapes(gm, [x])
    assert [n.name for n in gm.graph.nodes if fu.permutation_of(n, shapes)] == []
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)
    _check_roundtrip(model, x, res)


@pytest.mark.parametrize("kind", ["mixer", "resmlp"])
def test_mixer_and_resmlp_to_conv_stay_fixed(kind):
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    kw = dict(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4) if kind == "resmlp" else {}
    model = _randomise(MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=32, **kw))
    x = torch.randn(1, 3, 64, 64)
    res = rewrite(model, "conv", x)
    assert res.verification.passed and res.verification.max_abs_err < 1e-4
    assert res.verification.sizes[0].ref_scale > 0.01  # a real comparison
    assert _linears(res.module) == []
    assert res.classification_before == res.classification_after == "fixed"
    assert res.rigid_after == res.rigid_before
    _check_roundtrip(model, x, res)


def test_vit_tiny_to_conv():
    model = _randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64,
                                         num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    res = rewrite(model, "conv", x, analyze=False)
    assert res.verification.passed
    assert _linears(res.module) == []
    _check_roundtrip(model, x, res)
