"""Fixed means fixed, resizes, size branches, heads (issue 13). Ground truth: real forwards of the
eager model at other sizes and the shapes its modules produce there, never the analyser."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mixfx
from verdict_models import (BatchAbsorbingView, BlockDivisible, CenterCropThenConv, Conv1dNet, FoldToFixedSize,
                            GlobalFilter, InputSizeBranch, LearnedSamplingGrid, PoolToGridThenConv, ResizeThenConv,
                            RowsAsFeatures, SizeBranch, SpatialPyramidPooling, runs_at)


def _module_output_shapes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
             for name, m in model.named_modules() if name]
    with torch.no_grad():
        model(torch.randn(shape))
    for h in hooks:
        h.remove()
    return shapes


def test_divisibility_that_the_first_sizes_break_is_not_fixed():
    """Needs H, W % 64 == 0: 160x112 (1.25x / 0.875x of 128) fails, 256x128 runs."""
    torch.manual_seed(0)
    model = BlockDivisible().eval()
    assert not runs_at(model, (1, 3, 160, 112)) and not runs_at(model, (1, 3, 96, 144))
    assert runs_at(model, (1, 3, 256, 128)) and runs_at(model, (1, 3, 192, 320))
    r = mixfx.analyze(model, torch.randn(1, 3, 128, 128))
    assert r.classification != "fixed", r.summary
    assert r.rigid_nodes == []
    assert any(c.ok and c.input_shape != [1, 3, 128, 128] for c in r.concrete_checks)


def test_conv1d_net_pinned_by_its_linear_not_by_its_pool():
    torch.manual_seed(0)
    model = Conv1dNet().eval()
    for length in (48, 80, 96, 128):  # ground truth: no other length runs, and fc is where it fails
        assert not runs_at(model, (1, 3, length))
        try:
            with torch.no_grad():
                model.fc(model.pool(model.conv(torch.randn(1, 3, length))).flatten(1))
        except RuntimeError:
            pass
        else:
            raise AssertionError("fc accepted another length")
        model.pool(model.conv(torch.randn(1, 3, length)))  # the pool itself runs
    r = mixfx.analyze(model, torch.randn(1, 3, 64))
    assert r.classification == "fixed", r.summary
    assert [n.module for n in r.rigid_nodes] == ["fc"]
    assert all("L >=" not in c for c in r.constraints)  # nothing beside the pin contradicts it


def test_resize_to_a_constant_size_is_a_rigid_node_of_its_own_kind_not_the_head():
    torch.manual_seed(0)
    model = ResizeThenConv().eval()
    assert runs_at(model, (1, 3, 32, 48)) and runs_at(model, (1, 3, 80, 56))
    # ground truth: the conv stack sees 24x24 whatever the input
    assert _module_output_shapes(model, (1, 3, 80, 56))["body"] == _module_output_shapes(model, (1, 3, 32, 48))["body"]
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 48))
    assert r.classification != "fixed", r.summary  # it runs at other sizes
    assert r.classification != "convolutional", r.summary
    kinds = [(n.kind, n.op) for n in r.rigid_nodes]
    assert kinds == [("resized", "interpolate")]
    assert "24x24" in r.rigid_nodes[0].reason
    assert r.head is not None and r.head.node != r.rigid_nodes[0].node
    assert "mean" in r.head.node


@pytest.mark.parametrize("factory, example, dim, bound, constraint", [
    (SizeBranch, (1, 3, 32, 64), -1, 48, "W >= 49"),  # `if W > 48` after the stem, taken at W = 64
    (InputSizeBranch, (1, 3, 32, 48), -2, 40, "H <= 40"),  # `if H > 40` on the input, not taken at H = 32
])
def test_size_branch_is_a_constraint(factory, example, dim, bound, constraint):
    """A branch on a size, taken or not at the example: torch.export traces the side the example
    takes, and the trace holds on one side of the bound, an input constraint (not a pin) said
    with the model's own source line."""
    torch.manual_seed(0)
    model = factory().eval()
    # ground truth: the output formula changes at the bound (halved one step past it)
    for size, expected in ((bound, bound), (bound + 2, (bound + 2) // 2)):
        shape = list(example)
        shape[dim] = size
        with torch.no_grad():
            assert model(torch.randn(shape)).shape[dim] == expected
    r = mixfx.analyze(model, torch.randn(example))
    assert r.classification == "convolutional", r.summary
    branch = [c for c in r.constraints if "branch" in c]
    assert branch and branch[0].startswith(constraint), r.constraints
    assert "test_verdicts_sizes.py" not in branch[0] and "verdict_models.py" in branch[0]


def test_small_example_head_is_the_pool_not_a_one_pixel_conv(example_path):
    """At 8x8 a stride-32 ResNet's last maps are 1x1 at every nearby size: spatial dependence must
    be decided at a larger size too."""
    loaded = mixfx.load_model(example_path("resnet_cnn"))
    model = loaded.module.eval()
    big = _module_output_shapes(model, (1, 3, 64, 72))
    head_modules = [name for name, shape in big.items() if len(shape) == 4 and shape[2:] == (1, 1)]
    assert head_modules, big  # ground truth: the first module whose output is 1x1 at a large size
    r = mixfx.analyze(model, torch.randn(1, 3, 8, 8))
    assert r.head is not None and r.head.module == head_modules[0], (r.head, head_modules)


def test_other_sizes_are_distinct():
    torch.manual_seed(0)
    r = mixfx.analyze(BlockDivisible().eval(), torch.randn(1, 3, 128, 128))
    shapes = [tuple(c.input_shape) for c in r.concrete_checks]
    assert len(shapes) == len(set(shapes))
    assert all(s[2] != s[3] for s in shapes[1:])  # H != W


class _HeightChecked(nn.Module):
    """A CNN behind a check of the height only: W stays free."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        torch._assert(x.shape[2] == 32, "expects height 32")
        return self.head(torch.relu(self.conv(x)).amax((2, 3)))


def test_a_pin_on_one_dim_is_a_constraint_not_fixed():
    model = _HeightChecked().eval()
    with torch.no_grad():  # ground truth: eager runs
        model(torch.randn(1, 3, 32, 72))
        with pytest.raises(Exception):
            model(torch.randn(1, 3, 48, 32))
    report = mixfx.analyze(model, torch.randn(1, 3, 32, 32))
    assert report.classification != "fixed"
    assert "H == 32" in report.constraints


@pytest.mark.parametrize("factory, op, size", [(PoolToGridThenConv, "AdaptiveAvgPool2d", "6x6"),
                                              (LearnedSamplingGrid, "grid_sample", "12x12"),
                                              (CenterCropThenConv, "getitem", "cropped to 16x16")])
def test_a_resample_to_a_constant_grid_followed_by_convs_is_a_resize(factory, op, size):
    """An adaptive pool to 6x6, `grid_sample` at a learned 12x12 grid, or a 16x16 center crop,
    that the convs go on processing: nothing after it varies with the input (eager shapes), so
    it is a rigid node of kind "resized", not the head (the head is the mean) and not global
    context."""
    torch.manual_seed(0)
    model = factory().eval()
    assert runs_at(model, (1, 3, 32, 48)) and runs_at(model, (1, 3, 80, 56))
    assert _module_output_shapes(model, (1, 3, 80, 56))["body"] == _module_output_shapes(model, (1, 3, 32, 48))["body"]
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 48))
    assert r.classification == "polymorphic", r.summary
    assert [(n.kind, n.op) for n in r.rigid_nodes] == [("resized", op)]
    assert size in r.rigid_nodes[0].reason
    assert r.global_context == []
    assert r.head is not None and "mean" in r.head.node


def test_fold_to_a_fixed_size_is_rigid_and_not_the_head():
    """The fold's output is a map: the model has no head (its output is spatial)."""
    torch.manual_seed(0)
    model = FoldToFixedSize().eval()
    assert runs_at(model, (1, 3, 32, 48)) and not runs_at(model, (1, 3, 48, 64))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape[2:] == (32, 48)
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 48))
    assert r.classification == "fixed", r.summary
    assert [n.op for n in r.rigid_nodes] == ["fold"], r.rigid_nodes
    assert r.head is None, r.head


def test_a_view_whose_batch_takes_the_size_change_is_rigid():
    torch.manual_seed(0)
    model = BatchAbsorbingView().eval()
    with torch.no_grad():  # ground truth: more images out than in, not a failure
        assert model(torch.randn(1, 3, 64, 48)).shape[0] == 2
        assert model(torch.randn(1, 3, 32, 96)).shape[0] == 2
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 48))
    assert r.classification == "fixed", r.summary
    assert [(n.node, n.kind) for n in r.rigid_nodes] == [("view", "structural")], r.rigid_nodes


def test_a_fake_kernels_guard_that_the_eager_model_passes_is_not_rigid():
    """rfft2's fake kernel guards on (H//4)*(W//4) == 64 at 32x32, yet the eager FFT runs at any
    size; the filter multiply is what fails (32x36 runs: W//4//2 + 1 is still 5)."""
    torch.manual_seed(0)
    model = GlobalFilter().eval()
    assert runs_at(model, (1, 3, 32, 36)) and runs_at(model, (1, 3, 32, 39))
    assert not runs_at(model, (1, 3, 48, 48)) and not runs_at(model, (1, 3, 32, 40))
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 32))
    assert r.classification == "fixed", r.summary
    assert [n.op for n in r.rigid_nodes] == ["mul"], r.rigid_nodes
    assert "32 <= W <= 39" in r.constraints, r.constraints
    assert {m.op for m in r.global_mixing} >= {"fft_rfft2"}, r.global_mixing


def test_a_pin_of_one_dim_is_rigid_but_not_fixed():
    """A Linear over the rows pins H while W varies: it runs at other sizes (not fixed), yet the
    map stops varying along H before the head (not convolutional)."""
    torch.manual_seed(0)
    model = RowsAsFeatures().eval()
    assert runs_at(model, (1, 3, 32, 96)) and runs_at(model, (1, 3, 32, 20))
    assert not runs_at(model, (1, 3, 40, 48)) and not runs_at(model, (1, 3, 24, 48))
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 48))
    assert r.classification == "polymorphic", r.summary
    assert [(n.module, n.kind) for n in r.rigid_nodes] == [("fc", "structural")]
    assert "H == 32" in r.constraints


def test_spatial_pyramid_pooling_into_the_classifier_is_the_head_not_context():
    torch.manual_seed(0)
    model = SpatialPyramidPooling().eval()
    assert runs_at(model, (1, 3, 32, 48)) and runs_at(model, (1, 3, 80, 56))
    r = mixfx.analyze(model, torch.randn(1, 3, 32, 48))
    assert r.classification == "convolutional", r.summary
    assert r.global_context == [] and r.global_mixing == []
    assert r.head is not None and "adaptive_max_pool2d" in r.head.node
