"""timm's `PatchEmbed` inside a real ViT and Mixer (random weights, 2 blocks): conv -> patchify
-> conv keeps numerics, and the public rewrite keeps the classification."""
from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.timm

from mixfx.tracing import fx_trace  # noqa: E402
from passes._fxutil import annotate_example_inputs  # noqa: E402
from passes.conv_to_patchify import ConvToPatchify  # noqa: E402
from passes.patchify_to_conv import PatchifyToConv  # noqa: E402


def vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()


def mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=224, patch_size=16, num_blocks=2, embed_dim=64, num_classes=10).eval()


def vit_rect():  # rectangular patches, one input channel, non-square image
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=(96, 160),
                             patch_size=(16, 8), in_chans=1).eval()


@pytest.mark.parametrize("build,shape,path", [(vit, (1, 3, 224, 224), "patch_embed.proj"),
                                              (mixer, (1, 3, 224, 224), "stem.proj"),
                                              (vit_rect, (1, 1, 96, 160), "patch_embed.proj")])
def test_timm_patch_embed_round_trip(build, shape, path):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x)
    gm = fx_trace(model)
    annotate_example_inputs(gm, x)
    res = ConvToPatchify()(gm)
    assert [c.module for c in res.changes] == [path]
    assert isinstance(res.graph_module.get_submodule(path), nn.Linear)
    with torch.no_grad():
        got = res.graph_module(x)
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4), (want - got).abs().max()

    annotate_example_inputs(res.graph_module, x)
    back = PatchifyToConv()(res.graph_module)
    assert [c.module for c in back.changes] == [path], back.skipped
    assert isinstance(back.graph_module.get_submodule(path), nn.Conv2d)
    with torch.no_grad():
        got = back.graph_module(x)
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4), (want - got).abs().max()


def test_timm_vit_rewrite_api_keeps_classification():
    try:
        from mixfx.rewrite import rewrite
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"mixfx.rewrite not importable yet: {exc}")
    model = vit()
    x = torch.randn(1, 3, 224, 224)
    res = rewrite(model, to="linear", example_input=x, only="patchify")
    assert res.verification.passed
    assert [c.pass_name for c in res.changes] == ["conv_to_patchify"]
    assert res.classification_before == res.classification_after
    back = rewrite(res.module, to="conv", example_input=x, only="patchify", analyze=False)
    assert back.verification.passed
    assert [c.pass_name for c in back.changes] == ["patchify_to_conv"]
