"""The analyser's verdict on every bundled example, asserted exactly, and confirmed by real
forwards at other sizes (not just the meta-tensor checks the analyser itself runs)."""
from __future__ import annotations

import pytest
import torch

from mixfx import analyze, load_model

# name -> (classification, fully_convolutional, rigid modules, head module-or-node, constraints)
EXPECTED = {
    "resnet_cnn": ("convolutional", False, [], "pool", []),
    "se_cnn": ("convolutional", False, [], "pool", []),
    "fcn_segmentation": ("convolutional", True, [], None, []),
    "convmixer": ("convolutional", False, [], "pool", ["H >= 8", "W >= 8"]),
    "convnext_block": ("convolutional", False, [], "mean", None),
    "swin_windowed": ("convolutional", False, [], "mean", ["(H//4) % 7 == 0", "(W//4) % 7 == 0"]),
    "vit_interp_pos": ("polymorphic", False, [], "mean", ["H >= 16", "W >= 16"]),
    # a fixed model's constraint is its pin (issue 13: nothing beside it that it implies or contradicts)
    "mlp_mixer": ("fixed", False, ["blocks.0.mlp_tokens.fc1"], "mean", ["(H//16)*(W//16) == 196"]),
    "mlp_mixer_conv1x1": ("fixed", False, ["blocks.0.mlp_tokens.fc1"], "mean", ["(H//16)*(W//16) == 196"]),
    "mixer_reshape_patchify": ("fixed", False, ["blocks.0.mlp_tokens.fc1"], "mean", ["(H//16)*(W//16) == 196"]),
    "vit_fixed_pos": ("fixed", False, ["pos_embed"], "getitem_13", ["(H//16)*(W//16) + 1 == 197"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_verdict(name, example_report):
    cls, fully, rigid, head, constraints = EXPECTED[name]
    r = example_report(name)
    assert r.classification == cls, r.summary
    assert r.fully_convolutional is fully
    assert [n.module for n in r.rigid_nodes] == rigid
    if head is None:
        assert r.head is None
    else:
        assert head in (r.head.module, r.head.node)
    if constraints is not None:
        assert r.constraints == constraints
    assert r.disagreements == [], r.disagreements
    assert all(c.agrees for c in r.concrete_checks)


def test_mixer_rigid_reason_names_the_token_count(example_report):
    rigid = example_report("mlp_mixer").rigid_nodes[0]
    assert rigid.node == "blocks_0_mlp_tokens_fc1"
    assert rigid.op == "Linear" and rigid.kind == "structural"
    assert rigid.condition == "(H//16)*(W//16) == 196"
    assert "196 tokens = (H//16)*(W//16)" in rigid.reason


def test_conv1x1_mixer_is_still_fixed_at_the_same_node(example_report):
    """The seed question: writing every dense layer as a 1x1 conv does not make Mixer convolutional."""
    linear, conv = example_report("mlp_mixer"), example_report("mlp_mixer_conv1x1")
    assert conv.classification == linear.classification == "fixed"
    assert conv.rigid_nodes[0].module == linear.rigid_nodes[0].module
    assert conv.rigid_nodes[0].op == "Conv1d"
    assert conv.rigid_nodes[0].condition == linear.rigid_nodes[0].condition


def test_vit_fixed_pos_embed_is_the_rigid_node(example_report):
    r = example_report("vit_fixed_pos")
    (rigid,) = r.rigid_nodes
    assert (rigid.node, rigid.module, rigid.op) == ("add", "pos_embed", "add")
    assert rigid.condition == "(H//16)*(W//16) + 1 == 197"
    assert "Interpolate the position embedding" in (rigid.cure or "")
    # attention is global mixing too, but rigidity decides the class
    assert {m.module for m in r.global_mixing} == {"blocks.0.attn", "blocks.1.attn"}


def test_windowed_attention_is_local(example_report):
    assert example_report("swin_windowed").global_mixing == []
    assert [m.module for m in example_report("vit_interp_pos").global_mixing] == ["blocks.0.attn", "blocks.1.attn"]


def test_se_pooling_is_not_the_head(example_report):
    r = example_report("se_cnn")
    assert r.head.module == "pool"
    heads = [n for n in r.nodes if n.status == "head"]
    assert [n.name for n in heads] == ["pool"]


def test_output_formulas(example_report):
    assert example_report("fcn_segmentation").output_shape == ["1", "5", "H", "W"]
    assert example_report("resnet_cnn").output_shape == ["1", "10"]


def test_symbolic_node_shapes_are_formulas(example_report):
    r = example_report("resnet_cnn")
    by_name = {n.name: n for n in r.nodes}
    assert by_name["maxpool"].shape == "[1, 16, ceil(H/4), ceil(W/4)]"
    assert by_name["pool"].shape == "[1, 64, 1, 1]"
    assert by_name["pool"].status == "head"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verdict_matches_real_forwards(name, example_report):
    """Ground truth independent of the analyser: real forwards at the analyser's other sizes."""
    r = example_report(name)
    loaded = load_model(f"examples/{name}.py")
    for check in r.concrete_checks[1:]:
        x = torch.randn(check.input_shape)
        try:
            with torch.no_grad():
                loaded.module(x)
            ran = True
        except Exception:  # noqa: BLE001
            ran = False
        assert ran == (r.classification != "fixed"), (name, check.input_shape)


def test_constraint_violation_really_fails():
    loaded = load_model("examples/mixer_reshape_patchify.py")
    with pytest.raises(RuntimeError):
        loaded.module(torch.randn(1, 3, 230, 224))


def test_analysis_on_meta_device_needs_no_weights():
    loaded = load_model("examples/resnet_cnn.py", meta=True)
    assert all(p.is_meta for p in loaded.module.parameters())
    r = analyze(loaded.module, loaded.example_input)
    assert r.classification == "convolutional"


def test_input_shape_override_changes_formula_anchor():
    loaded = load_model("examples/resnet_cnn.py", input_shape="1x3x160x192")
    r = analyze(loaded.module, loaded.example_input)
    assert r.input_shape == [1, 3, 160, 192]
    assert r.classification == "convolutional"


@pytest.mark.parametrize("name", ["resnet_cnn", "convmixer", "swin_windowed", "fcn_segmentation"])
def test_every_node_formula_matches_concrete_shapes(name, example_report):
    """Each printed formula, evaluated at another size, gives the shape a real propagation gives."""
    import math

    from mixfx.shapes import propagate_concrete
    from mixfx.tracing import trace

    r = example_report(name)
    loaded = load_model(f"examples/{name}.py")
    gm = trace(loaded.module, loaded.example_input).graph_module
    size = r.concrete_checks[1].input_shape
    run = propagate_concrete(gm, tuple(size))
    checked = 0
    for node in r.nodes:
        shape = run.shapes.get(node.name)
        if not node.shape or not node.shape.startswith("[") or not isinstance(shape, tuple):
            continue
        got = eval(node.shape, {"ceil": math.ceil, "max": max, "min": min}, {"H": size[2], "W": size[3]})
        assert tuple(got) == shape, (node.name, node.shape, shape)
        checked += 1
    assert checked > 10


SHAPE_BRANCH_MODEL = '''
import torch, torch.nn as nn, torch.nn.functional as F
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tok = nn.Linear(64, 64)
        self.head = nn.Linear(8, 10)
    def forward(self, x):
        if x.shape[-1] % 2 == 1:  # fx cannot trace this; torch.export can
            x = F.pad(x, (0, 1))
        x = self.conv(x).flatten(2)
        x = self.tok(x)
        return self.head(x.mean(-1))
def build_model():
    return Net()
INPUT_SHAPE = (1, 3, 8, 8)
'''


def test_export_fallback_still_names_the_module(tmp_path):
    path = tmp_path / "shape_branch.py"
    path.write_text(SHAPE_BRANCH_MODEL)
    loaded = load_model(str(path))
    r = analyze(loaded.module, loaded.example_input)
    assert r.tracer == "export"
    assert any("shape_branch.py:10" in n for n in r.notes)
    (rigid,) = r.rigid_nodes
    assert rigid.module == "tok" and rigid.op == "aten.linear"
    assert rigid.condition == "H*W == 64"
    assert "Linear over 64 positions = H*W" in rigid.reason
