"""Real timm architectures (random weights, built on the meta device) classified correctly."""
from __future__ import annotations

import pytest

pytest.importorskip("timm")

from mixfx import analyze, load_model  # noqa: E402


def report(spec: str):
    loaded = load_model(spec, meta=True)
    return analyze(loaded.module, loaded.example_input, name=loaded.name)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "regnetx_002"])
def test_cnns_are_convolutional(name):
    r = report(f"timm:{name}")
    assert r.classification == "convolutional", r.summary
    assert r.rigid_nodes == [] and r.global_mixing == []
    assert r.head is not None and "pool" in (r.head.module or "")
    assert r.confirmed


def test_mixer_is_fixed_by_guard_and_by_token_mixing():
    r = report("timm:mixer_s16_224")
    assert r.classification == "fixed"
    kinds = [(n.kind, n.module, n.condition) for n in r.rigid_nodes]
    assert ("guarded", "stem", "H == 224 and W == 224") in kinds
    structural = [k for k in kinds if k[0] == "structural"]
    assert structural == [("structural", "blocks.0.mlp_tokens.fc1", "(H//16)*(W//16) == 196")]
    guarded = next(n for n in r.rigid_nodes if n.kind == "guarded")
    assert "dynamic_img_size=True" in (guarded.cure or "")
    assert r.confirmed


def test_vit_is_fixed_by_guard_and_position_embedding():
    r = report("timm:vit_tiny_patch16_224")
    assert r.classification == "fixed"
    structural = [n for n in r.rigid_nodes if n.kind == "structural"]
    assert [(n.module, n.condition) for n in structural] == [("pos_embed", "(H//16)*(W//16) + 1 == 197")]
    assert any(n.kind == "guarded" for n in r.rigid_nodes)


def test_dynamic_vit_is_polymorphic():
    r = report("timm:vit_tiny_patch16_224?dynamic_img_size=True")
    assert r.classification == "polymorphic", r.summary
    assert r.rigid_nodes == []
    assert r.global_mixing and r.global_mixing[0].module == "blocks.0.attn"
    assert "H % 16 == 0" in r.constraints
