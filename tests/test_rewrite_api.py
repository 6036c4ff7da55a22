"""`mixfx.rewrite` and `mixfx.verify`: results, invariance of the classification, failures."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mixfx.errors import VerificationError  # noqa: E402
from mixfx.rewrite import PassError, RewriteResult, count_permutes, rewrite  # noqa: E402
from mixfx.verify import verify  # noqa: E402
from passes.base import RewritePass, RewritePassResult  # noqa: E402

try:
    import mixfx.analysis  # noqa: F401
    HAVE_ANALYSIS = True
except ImportError:  # pragma: no cover
    HAVE_ANALYSIS = False
needs_analysis = pytest.mark.skipif(not HAVE_ANALYSIS, reason="mixfx.analysis not available")


def load_example(name):
    path = ROOT / "examples" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"examples/{name}.py not present")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.build_model().eval(), torch.randn(mod.INPUT_SHAPE)


class SmallConvNeXt(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_rewrite_result_fields_and_json():
    model = SmallConvNeXt().eval()
    x = torch.randn(1, 3, 32, 40)
    before = copy.deepcopy(model.state_dict())
    res = rewrite(model, "conv", x, analyze=False)
    assert isinstance(res, RewriteResult)
    assert isinstance(res.module, torch.fx.GraphModule)
    assert {c.module for c in res.changes if c.pass_name == "linear_to_conv"} == {"fc1", "fc2", "head"}
    assert res.verification.passed and len(res.verification.sizes) == 2  # example size + a second size
    assert res.verification.sizes[1].input_shape != (1, 3, 32, 40)
    assert count_permutes(res.module, x) == 0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["verification"]["passed"] and d["module_counts"]["Conv2d"] == 4
    # the original is untouched
    assert isinstance(model.fc1, nn.Linear)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_round_trip_restores_module_types_and_numerics():
    """Dense passes only: with the patchify passes, `--to linear` also turns the strided stem conv
    into patchify + Linear, which is a different (documented) module type."""
    model = SmallConvNeXt().eval()
    x = torch.randn(2, 3, 32, 40)
    conv = rewrite(model, "conv", x, only="dense", analyze=False).module
    back = rewrite(conv, "linear", x, only="dense", analyze=False).module
    for name, mod in model.named_modules():
        if name and isinstance(mod, (nn.Linear, nn.LayerNorm, nn.Conv2d)):
            assert type(back.get_submodule(name)) is type(mod), name
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)


def test_only_selects_passes():
    model = SmallConvNeXt().eval()
    x = torch.randn(1, 3, 32, 32)
    res = rewrite(model, "conv", x, only="layout", analyze=False)
    assert res.passes == ["layout"] and not [c for c in res.changes if c.pass_name == "linear_to_conv"]
    res = rewrite(model, "conv", x, only="dense", analyze=False)
    assert res.passes[0] == "linear_to_conv" and res.passes[-1] == "layout"


class _Break(RewritePass):
    name = "break"

    def call(self, gm):
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
                with torch.no_grad():
                    gm.get_submodule(n.target).weight.mul_(1.5)  # a wrong rewrite
                break
        return RewritePassResult(gm, True)


class _Raise(RewritePass):
    name = "boom"

    def call(self, gm):
        raise RuntimeError("kaboom")


def test_wrong_rewrite_raises_verification_error_and_leaves_original():
    model = SmallConvNeXt().eval()
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    with pytest.raises(VerificationError) as info:
        rewrite(model, "conv", x, passes=[_Break()], analyze=False)
    assert info.value.exit_code == 4
    assert not info.value.result.verification.passed
    torch.testing.assert_close(model(x), ref)  # the deep copy took the damage


def test_failing_pass_raises_clear_error():
    model = SmallConvNeXt().eval()
    with pytest.raises(PassError, match="boom.*kaboom"):
        rewrite(model, "conv", torch.randn(1, 3, 32, 32), passes=[_Raise()], analyze=False)


def test_verify_handles_nested_outputs_and_reports_errors():
    class Multi(nn.Module):
        def __init__(self, bump=0.0):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bump = bump

        def forward(self, x):
            y = self.fc(x)
            return {"a": y, "b": (y * 2, [y + self.bump, 3])}

    a = Multi()
    b = copy.deepcopy(a)
    v = verify(a, b, torch.randn(2, 4))
    assert v.passed and v.max_abs_err == 0
    b.bump = 1e-2
    v = verify(a, b, torch.randn(2, 4))
    assert not v.passed and v.max_abs_err == pytest.approx(1e-2, rel=1e-3)
    assert json.loads(json.dumps(v.to_dict()))["passed"] is False
    # a size the rewritten model cannot take is a failure, with the reason
    v = verify(nn.Identity(), nn.Linear(4, 4), torch.randn(2, 4), extra_sizes=[(2, 5)])
    assert not v.passed and "fails" in (v.sizes[1].error or "")


@needs_analysis
def test_mixer_stays_fixed_with_the_same_rigid_node():
    model, x = load_example("mlp_mixer")
    res = rewrite(model, "conv", x)
    assert res.classification_before == res.classification_after == "fixed"
    assert res.rigid_after == res.rigid_before and res.rigid_before
    gm = res.module
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    # fixed: verified at the example size only
    assert len(res.verification.sizes) == 1


@needs_analysis
def test_convnext_stays_convolutional_both_ways():
    model, x = load_example("convnext_block")
    res = rewrite(model, "conv", x)
    assert res.classification_before == res.classification_after == "convolutional"
    assert len(res.verification.sizes) == 2


def test_second_size_is_shrunk_where_the_input_allows_it():
    from mixfx.rewrite import second_sizes

    assert second_sizes(torch.empty(1, 3, 224, 224)) == [(1, 3, 192, 160), (1, 3, 256, 288), (1, 3, 448, 448)]
    assert second_sizes(torch.empty(1, 3, 32, 40))[0] == (1, 3, 64, 104)  # too small to shrink
    res = rewrite(SmallConvNeXt().eval(), "conv", torch.randn(1, 3, 224, 224), analyze=False)
    assert [s.input_shape for s in res.verification.sizes] == [(1, 3, 224, 224), (1, 3, 192, 160)]


class _NeedsHeight(nn.Module):
    """Rejects inputs lower than 200 pixels: the shrunk second size does not run."""

    def __init__(self):
        super().__init__()
        self.body = SmallConvNeXt()

    def forward(self, x):
        torch._assert(x.shape[2] >= 200, "input too small")
        return self.body(x)


def test_second_size_falls_back_to_a_grown_one():
    res = rewrite(_NeedsHeight().eval(), "conv", torch.randn(1, 3, 224, 224), analyze=False)
    assert [s.input_shape for s in res.verification.sizes] == [(1, 3, 224, 224), (1, 3, 256, 288)]


def test_shared_reference_outputs_run_the_original_once_per_input():
    model = SmallConvNeXt().eval()
    x = torch.randn(1, 3, 96, 128)
    real_calls = []
    model.register_forward_hook(lambda m, args, out: real_calls.append(args[0].shape)
                                if args[0].device.type != "meta" else None)
    alone = rewrite(model, "conv", x, analyze=False)
    n_alone = len(real_calls)
    shared: dict = {}
    real_calls.clear()
    first = rewrite(model, "conv", x, analyze=False, reference_outputs=shared)
    assert len(real_calls) == n_alone and len(shared) == 2  # the example size and the second size
    real_calls.clear()
    second = rewrite(model, "linear", x, analyze=False, reference_outputs=shared)
    assert len(real_calls) == n_alone - 2  # both reference outputs came from the dict
    assert first.verification.to_dict() == alone.verification.to_dict()
    # a caller's own forward through reference_output is the verification's reference too
    from mixfx.verify import reference_output

    mine: dict = {}
    out = reference_output(model, x.shape, mine)
    real_calls.clear()
    again = rewrite(model, "conv", x, analyze=False, reference_outputs=mine)
    assert len(real_calls) == n_alone - 1 and len(mine) == 2
    assert again.verification.to_dict() == alone.verification.to_dict()
    assert torch.equal(out, shared[next(iter(shared))])
    assert second.verification.passed and [s.input_shape for s in second.verification.sizes] == \
        [s.input_shape for s in first.verification.sizes]
