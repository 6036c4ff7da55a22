"""`--to polymorphic` on timm architectures (random weights). Ground truth at other sizes: timm's
own `dynamic_img_size=True` build of the same model with the same weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

timm = pytest.importorskip("timm")

import mixfx  # noqa: E402
from mixfx.errors import EXIT_VERIFY  # noqa: E402
from passes.cure import CureRefused  # noqa: E402


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_vit_cure_equals_timm_dynamic_img_size(name, prefix):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    dynamic = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    assert (result.classification_before, result.classification_after) == ("fixed", "polymorphic")
    by_module = {(c.module, c.after.split(" ")[0]) for c in result.changes}
    assert ("patch_embed", "dropped") in by_module and ("pos_embed", "`pos_embed`") in by_module
    assert f"{prefix} prefix token(s) kept" in " ".join(c.after for c in result.changes)
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        for size in [(2, 3, 160, 256), (1, 3, 288, 208)]:
            y = torch.randn(size)
            want = dynamic(y)
            assert (result.module(y) - want).abs().max() <= 1e-5 * want.abs().max()


def test_pit_position_map_cured():
    """PiT adds its position embedding to a [1, C, 27, 27] map (not to tokens)."""
    torch.manual_seed(0)
    model = timm.create_model("pit_ti_224", pretrained=False).eval()
    result = mixfx.rewrite(model, to="polymorphic", example_input=torch.randn(1, 3, 224, 224))
    assert result.classification_after == "polymorphic"
    assert any(c.module == "pos_embed" and "resampled" in c.after for c in result.changes)
    with torch.no_grad():
        assert result.module(torch.randn(1, 3, 256, 192)).shape == (1, 1000)


def test_mixer_is_refused_naming_the_token_mlp():
    model = timm.create_model("mixer_s32_224", pretrained=False).eval()
    with pytest.raises(CureRefused) as info:
        mixfx.rewrite(model, to="polymorphic", example_input=torch.randn(1, 3, 224, 224))
    assert info.value.exit_code == EXIT_VERIFY
    assert [u.module for u in info.value.nodes] == ["blocks.0.mlp_tokens.fc1"]
    assert "49 positions" in info.value.message
