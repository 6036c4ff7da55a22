"""Issue 13 on real timm architectures (random weights). Ground truth from eager forwards: plain
meta-tensor forwards at other sizes (no mixfx machinery) and real forwards of the small models."""
from __future__ import annotations

import pytest
import torch

import mixfx
from verdict_models import reach_grows

timm = pytest.importorskip("timm")


def _meta(name: str, **kw):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw).eval()


def _meta_runs(model, shape) -> bool:
    try:
        with torch.no_grad():
            model(torch.empty(shape, device="meta"))
        return True
    except Exception:  # noqa: BLE001
        return False


class _Features(torch.nn.Module):
    """The pre-head map of a timm model (`forward_features`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


@pytest.mark.parametrize("name", ["mobilevit_xxs", "efficientvit_b0"])
def test_attention_inside_timm_leaf_modules_is_global_mixing(name):
    torch.manual_seed(0)
    real = timm.create_model(name, pretrained=False).eval()
    # ground truth: on the pre-head map, a corner change travels further on a larger input
    assert reach_grows(_Features(real), (1, 3, 256, 320), (1, 3, 512, 640))
    rep = mixfx.analyze(_meta(name), input_shape=(1, 3, 256, 256))
    assert rep.classification == "polymorphic", rep.summary
    assert rep.global_mixing and all(m.module for m in rep.global_mixing)


def test_crossvit_resizes_its_input_and_is_not_fixed():
    model = _meta("crossvit_tiny_240")
    assert _meta_runs(model, (1, 3, 288, 224)) and _meta_runs(model, (1, 3, 192, 256))
    rep = mixfx.analyze(model, input_shape=(1, 3, 240, 240))
    assert rep.classification == "polymorphic", rep.summary
    resized = [r for r in rep.rigid_nodes if r.kind == "resized"]
    assert resized and "224x224" in resized[0].reason
    assert rep.head is None or rep.head.node != resized[0].node
    assert rep.global_mixing  # its attention, over tokens of the resized image


def test_maxvit_runs_at_other_sizes_so_it_is_not_fixed_even_when_cut_short():
    model = _meta("maxvit_pico_rw_256")
    assert _meta_runs(model, (1, 3, 512, 256))
    assert not _meta_runs(model, (1, 3, 320, 224))  # the sizes near the example break H % 256
    rep = mixfx.analyze(model, input_shape=(1, 3, 256, 256), symbolic_budget_s=0.5)
    assert rep.classification == "polymorphic", rep.summary  # grid attention is global
    assert rep.rigid_nodes == []
    assert any("--symbolic-budget" in n for n in rep.notes)
    # complete although cut short: output, head and divisibility from the size search
    assert rep.output_shape == ["1", "1000"]
    assert rep.head is not None
    assert any(c.startswith("H % 256 == 0") for c in rep.constraints), rep.constraints
    assert not any("Mod(" in c or "FloorDiv" in c for c in rep.constraints)


def test_efficientformerv2_head_is_its_pool_not_an_attention_inside_the_stages():
    model = _meta("efficientformerv2_s0")
    for shape in ((1, 3, 288, 192), (1, 3, 448, 224), (1, 3, 256, 256)):  # ground truth: fixed
        assert not _meta_runs(model, shape)
    with torch.no_grad():  # the map that reaches the head is still 7x7: positions end after the stages
        assert tuple(model.forward_features(torch.empty(1, 3, 224, 224, device="meta")).shape[2:]) == (7, 7)
    rep = mixfx.analyze(model, input_shape=(1, 3, 224, 224))
    assert rep.classification == "fixed", rep.summary
    assert rep.head is not None and not (rep.head.module or "").startswith("stages"), rep.head
    assert not any("Mod(" in c or "FloorDiv" in c for c in rep.constraints), rep.constraints
