"""Ground-truth checks for the models in examples/ (no mixfx involved).

Every example file defines ``build_model()``, ``INPUT_SHAPE`` and a docstring
stating the expected mixfx verdict.  Here we check, by actually running the
models, that the verdicts are right in the concrete sense:

* the model runs at INPUT_SHAPE and ``torch.fx.symbolic_trace`` reproduces it;
* "convolutional" / "polymorphic" models also run (eagerly and traced) at two
  other input sizes with H != W;
* "fixed" models raise at another input size.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.fx import symbolic_trace

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

# name -> (classification, output shape at INPUT_SHAPE (None = same H, W as the input), size multiple)
EXPECTED = {
    "resnet_cnn": ("convolutional", (1, 10), 32),
    "fcn_segmentation": ("convolutional", None, 32),
    "se_cnn": ("convolutional", (1, 10), 32),
    "convmixer": ("convolutional", (1, 10), 32),
    "mlp_mixer": ("fixed", (1, 10), 16),
    "mlp_mixer_conv1x1": ("fixed", (1, 10), 16),
    "mixer_reshape_patchify": ("fixed", (1, 10), 16),
    "vit_fixed_pos": ("fixed", (1, 10), 16),
    "vit_interp_pos": ("polymorphic", (1, 10), 32),
    "convnext_block": ("convolutional", (1, 10), 32),
    "swin_windowed": ("convolutional", (1, 10), 28),
    "unet": ("convolutional", None, 16),
}

FCN_CLASSES = 5


def load_example(name: str):
    path = EXAMPLES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_mixfx_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def other_sizes(shape, multiple):
    """Two sizes with H != W: (1.25 H, 0.75 W) and (0.75 H, 1.25 W), rounded."""
    _, _, h, w = shape
    return [
        (_round_to(1.25 * h, multiple), _round_to(0.75 * w, multiple)),
        (_round_to(0.75 * h, multiple), _round_to(1.25 * w, multiple)),
    ]


@pytest.fixture(scope="module")
def examples():
    cache = {}

    def get(name):
        if name not in cache:
            module = load_example(name)
            cache[name] = (module, module.build_model())
        return cache[name]

    return get


def test_every_example_file_is_covered():
    files = {p.stem for p in EXAMPLES_DIR.glob("*.py")}
    assert files == set(EXPECTED), f"uncovered: {files ^ set(EXPECTED)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_convention(name, examples):
    module, model = examples(name)
    classification = EXPECTED[name][0]
    doc = inspect.getdoc(module)
    assert doc, f"{name}: missing module docstring"
    assert 3 <= len(doc.splitlines()) <= 6, f"{name}: docstring should be 3-6 lines"
    assert classification in doc.lower(), f"{name}: docstring must state '{classification}'"
    shape = module.INPUT_SHAPE
    assert isinstance(shape, tuple) and len(shape) == 4 and shape[:2] == (1, 3)
    assert isinstance(model, nn.Module)
    assert not model.training, f"{name}: build_model() must return an eval() model"
    # reproducible random weights
    again = module.build_model()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name}: weights of {k} differ between builds"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_and_trace_at_input_shape(name, examples):
    module, model = examples(name)
    out_shape = EXPECTED[name][1]
    x = torch.randn(module.INPUT_SHAPE)
    with torch.no_grad():
        y = model(x)
        gm = symbolic_trace(model)
        y_traced = gm(x)
    if out_shape is None:  # fully convolutional: [B, n_classes, H, W]
        out_shape = (x.shape[0], FCN_CLASSES, *x.shape[-2:])
    assert tuple(y.shape) == out_shape
    assert torch.allclose(y, y_traced, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name", sorted(n for n, (c, _, _) in EXPECTED.items() if c in ("convolutional", "polymorphic"))
)
def test_runs_at_other_sizes(name, examples):
    module, model = examples(name)
    out_shape, multiple = EXPECTED[name][1], EXPECTED[name][2]
    gm = symbolic_trace(model)
    for h, w in other_sizes(module.INPUT_SHAPE, multiple):
        assert h != w
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            y = model(x)
            y_traced = gm(x)
        expected = (1, FCN_CLASSES, h, w) if out_shape is None else out_shape
        assert tuple(y.shape) == expected, (name, h, w)
        assert torch.allclose(y, y_traced, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, (c, _, _) in EXPECTED.items() if c == "fixed"))
def test_fixed_models_reject_other_sizes(name, examples):
    module, model = examples(name)
    multiple = EXPECTED[name][2]
    for h, w in other_sizes(module.INPUT_SHAPE, multiple):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad(), pytest.raises(RuntimeError):
            model(x)


def test_swin_needs_multiple_of_28():
    module = load_example("swin_windowed")
    model = module.build_model()
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 224, 192))  # 48 is not divisible by 7


class _FailingNode(torch.fx.Interpreter):
    """Interpreter that remembers the node whose execution raised."""

    failed = None

    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception:
            if self.failed is None:
                self.failed = n
            raise


# the node a concrete forward at a different size fails at (ground truth for the rigid node)
EXPECTED_FAILING_NODE = {
    "mlp_mixer": ("call_module", "blocks.0.mlp_tokens.fc1"),
    "mlp_mixer_conv1x1": ("call_module", "blocks.0.mlp_tokens.fc1"),
    "mixer_reshape_patchify": ("call_module", "blocks.0.mlp_tokens.fc1"),
    "vit_fixed_pos": ("call_function", "add"),  # x + self.pos_embed
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILING_NODE))
def test_fixed_models_fail_at_rigid_node(name, examples):
    module, model = examples(name)
    gm = symbolic_trace(model)
    (h, w), _ = other_sizes(module.INPUT_SHAPE, EXPECTED[name][2])
    interp = _FailingNode(gm)
    with torch.no_grad(), pytest.raises(RuntimeError):
        interp.run(torch.randn(1, 3, h, w))
    node = interp.failed
    op, target = EXPECTED_FAILING_NODE[name]
    assert node is not None and node.op == op
    if op == "call_module":
        assert node.target == target
    else:
        assert node.name == target
        assert any(getattr(a, "target", None) == "pos_embed" for a in node.args)


def test_mixer_only_pins_the_token_count():
    """Quirk worth knowing: Mixer token MLPs pin (H/16)*(W/16), not H and W separately."""
    module = load_example("mlp_mixer")
    model = module.build_model()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 448, 112)).shape == (1, 10)  # 28 * 7 == 196 tokens
