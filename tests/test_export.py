"""`mixfx.export` / `mixfx.dynamic_shapes` / `mixfx export`: files that run at other sizes.

Ground truth is eager: which sizes a model accepts is found by running it, and an exported file
is checked here again at a size the export's own verification did not use."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mixfx  # noqa: E402
import importlib  # noqa: E402
from mixfx.cli import app  # noqa: E402
from mixfx.errors import EXIT_OUTPUT, EXIT_USAGE, EXIT_VERIFY, OutputError, UsageError  # noqa: E402
from mixfx.export import ExportVerificationError, MissingDependencyError  # noqa: E402
from mixfx.export_shapes import derive_export_shapes  # noqa: E402

export_module = importlib.import_module("mixfx.export")  # `mixfx.export` itself is the function

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class TinyResNet(nn.Module):
    """Stem stride 2 + max pool + three strided residual stages + global pool + Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(Block(8, 16, 2), Block(16, 24, 2), Block(24, 32, 2))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class PatchViT(nn.Module):
    """Patchify by reshape (needs H % 16 == 0 and W % 16 == 0), attention over all tokens."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Linear(3 * 16 * 16, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 16, 16, w // 16, 16).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 16) * (w // 16), -1)
        x = self.embed(x)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        return self.head(x.mean(1))


class FixedPosViT(nn.Module):
    """Strided-conv patches plus a learned position embedding for a 4x4 grid: fixed at 64x64."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(x.mean(1))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    m = cls().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong size shows numerically
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _runs_eager(model: nn.Module, shape) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(shape))
        return True
    except Exception:  # noqa: BLE001 - a size the model rejects
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def _no_leftovers(folder: Path, keep: set[str]) -> bool:
    return {p.name for p in folder.iterdir()} == keep


# ----------------------------------------------------------------------------- ResNet-like CNN
def test_resnet_like_pt2_runs_at_other_sizes(tmp_path):
    model = _model(TinyResNet)
    x = torch.randn(1, 3, 64, 80)
    result = mixfx.export(model, x, tmp_path / "net.pt2")
    assert result.verified and result.format == "pt2" and result.dynamic_shapes_used == "mixfx"
    shapes = [tuple(c.input_shape) for c in result.checks]
    assert shapes[0] == (1, 3, 64, 80) and len(shapes) == 3
    assert all(s[2] != s[3] for s in shapes[1:]) and len(set(shapes)) == 3
    assert _no_leftovers(tmp_path, {"net.pt2"})
    # an independent size, not one the export verified at
    program = torch.export.load(str(tmp_path / "net.pt2")).module()
    y = torch.randn(1, 3, 112, 48)
    with torch.no_grad():
        assert _close(program(y), model(y))


def test_resnet_like_min_size_keeps_every_varying_size_at_least_two(tmp_path):
    """torch.export specialises sizes 0 and 1: the smallest exported size must leave every
    intermediate map >= 2 pixels (ground truth: eager shapes at that size and one below)."""
    model = _model(TinyResNet)
    spec = derive_export_shapes(model, torch.randn(1, 3, 64, 80))
    h = spec.dims[0]
    assert not h.static and h.modulus == 1

    def smallest_map(size):
        shapes = []
        hook = lambda m, i, o: shapes.append(o.shape[2])  # noqa: E731
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
        with torch.no_grad():
            model(torch.randn(1, 3, size, 80))
        for handle in handles:
            handle.remove()
        return min(shapes)

    assert smallest_map(h.min_size) >= 2
    assert smallest_map(h.min_size - 1) < 2


def test_resnet_like_onnx_runs_in_onnxruntime_at_other_sizes(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model(TinyResNet)
    result = mixfx.export(model, torch.randn(1, 3, 64, 80), str(tmp_path / "net.onnx"))
    assert result.verified and result.format == "onnx"
    assert _no_leftovers(tmp_path, {"net.onnx"})
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for shape in ((1, 3, 96, 40), (1, 3, 48, 128)):
        y = torch.randn(shape)
        got = torch.from_numpy(session.run(None, {name: y.numpy()})[0])
        with torch.no_grad():
            assert _close(got, model(y))


def test_dynamic_shapes_for_users_who_export_themselves():
    model = _model(TinyResNet)
    x = torch.randn(1, 3, 64, 80)
    spec = mixfx.dynamic_shapes(model, x)
    assert set(spec) == {"x"} and set(spec["x"]) == {2, 3}
    program = torch.export.export(model, (x,), dynamic_shapes=spec).module()
    y = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        assert _close(program(y), model(y))


# ----------------------------------------------------------------------------- ViT with constraints
def test_vit_divisibility_becomes_a_derived_dim(tmp_path):
    model = _model(PatchViT)
    x = torch.randn(1, 3, 64, 96)
    # ground truth from eager: multiples of 16 run, anything else does not
    assert all(_runs_eager(model, (1, 3, s, 96)) for s in (32, 48, 80, 112))
    assert not any(_runs_eager(model, (1, 3, s, 96)) for s in (40, 56, 72))
    spec = mixfx.dynamic_shapes(model, x)
    h, w = spec["x"][2], spec["x"][3]
    assert type(h).__name__ == "_DerivedDim" and type(w).__name__ == "_DerivedDim"
    shapes = derive_export_shapes(model, x)
    assert [(d.modulus, d.residue) for d in shapes.dims] == [(16, 0), (16, 0)]
    assert "H % 16 == 0" in shapes.constraints
    result = mixfx.export(model, x, tmp_path / "vit.pt2")
    assert result.verified
    assert all(c.input_shape[2] % 16 == 0 and c.input_shape[3] % 16 == 0 for c in result.checks)
    program = torch.export.load(str(tmp_path / "vit.pt2")).module()
    y = torch.randn(1, 3, 128, 32)
    with torch.no_grad():
        assert _close(program(y), model(y))


# ----------------------------------------------------------------------------- fixed models
def test_fixed_model_exports_static_naming_the_pinning_node(tmp_path):
    model = _model(FixedPosViT)
    x = torch.randn(1, 3, 64, 64)
    assert not _runs_eager(model, (1, 3, 80, 64))  # ground truth: pinned
    with pytest.warns(UserWarning, match="pos"):
        spec = mixfx.dynamic_shapes(model, x)
    assert spec == {"x": None}
    result = mixfx.export(model, x, tmp_path / "fixed.pt2")
    assert result.verified and result.shapes.static and len(result.checks) == 1
    assert result.shapes.pinned_by is not None and "pos" in (result.shapes.pinned_by.module or "") + \
        result.shapes.pinned_by.reason
    assert any("polymorphic" in n for n in result.notes)
    program = torch.export.load(str(tmp_path / "fixed.pt2"))
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x")
    assert all(isinstance(d, int) for d in placeholder.meta["val"].shape)


# ----------------------------------------------------------------------------- failure paths
def test_bad_suffix_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"\.onnx or \.pt2"):
        mixfx.export(_model(TinyResNet), torch.randn(1, 3, 64, 80), tmp_path / "net.tflite")
    result = CliRunner().invoke(app, ["export", str(ROOT / "examples" / "resnet_cnn.py"), "-o",
                                      str(tmp_path / "net.tflite")])
    assert result.exit_code == EXIT_USAGE
    assert ".onnx or .pt2" in result.output and "Traceback" not in result.output
    assert _no_leftovers(tmp_path, set())


def test_missing_onnx_packages_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mixfx\[onnx\]") as info:
        mixfx.export(_model(TinyResNet), torch.randn(1, 3, 64, 80), tmp_path / "net.onnx")
    assert info.value.exit_code == EXIT_USAGE and "onnxruntime" in info.value.message
    result = CliRunner().invoke(app, ["export", str(ROOT / "examples" / "resnet_cnn.py"), "-o",
                                      str(tmp_path / "net.onnx")])
    assert result.exit_code == EXIT_USAGE and "mixfx[onnx]" in result.output
    assert _no_leftovers(tmp_path, set())


def test_mismatch_exits_4_and_leaves_the_old_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "net.pt2"
    target.write_bytes(b"previous export")
    real_load = export_module._load

    def corrupted(path, fmt):
        run = real_load(path, fmt)
        return lambda x: [o + 1e-2 * o.abs().max() for o in run(x)]

    monkeypatch.setattr(export_module, "_load", corrupted)
    with pytest.raises(ExportVerificationError) as info:
        mixfx.export(_model(TinyResNet), torch.randn(1, 3, 64, 80), target)
    assert info.value.exit_code == EXIT_VERIFY and "nothing was written" in info.value.message
    assert info.value.result is not None and not info.value.result.verified
    assert target.read_bytes() == b"previous export"
    assert _no_leftovers(tmp_path, {"net.pt2"})


def test_never_writes_over_the_input_model(tmp_path):
    source = tmp_path / "model.pt2"
    source.write_bytes(b"the user's file")
    with pytest.raises(OutputError) as info:
        mixfx.export(_model(TinyResNet), torch.randn(1, 3, 64, 80), source, input_path=source)
    assert info.value.exit_code == EXIT_OUTPUT
    assert source.read_bytes() == b"the user's file"


def test_cli_export_pt2_with_rewrite_first(tmp_path):
    out = tmp_path / "conv.pt2"
    result = CliRunner().invoke(app, ["export", str(ROOT / "examples" / "convnext_block.py"), "-o", str(out),
                                      "--to", "conv", "--input", "1x3x32x48"])
    assert result.exit_code == 0, result.output
    assert "rewritten first: --to conv" in result.output and "verified at 3 sizes" in result.output
    program = torch.export.load(str(out))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("linear" in t for t in targets)  # the Linears became 1x1 convs before export
    assert _no_leftovers(tmp_path, {"conv.pt2"})


def test_cli_unknown_rewrite_target_is_rejected_by_rewrite(tmp_path):
    result = CliRunner().invoke(app, ["export", str(ROOT / "examples" / "resnet_cnn.py"), "-o",
                                      str(tmp_path / "x.pt2"), "--to", "nonsense"])
    assert result.exit_code == EXIT_USAGE and "nonsense" in result.output
    assert _no_leftovers(tmp_path, set())


def test_torch_failure_on_the_spec_falls_back_to_auto_and_is_still_verified(tmp_path, monkeypatch):
    """torch.export can fail inside its own solver on a valid spec (timm's ese_vovnet): the
    fallback is Dim.AUTO, and the verification at the other sizes still decides."""
    real_export = torch.export.export
    calls = []

    def flaky(model, args, *, dynamic_shapes=None, **kwargs):
        calls.append(dynamic_shapes)
        if len(calls) == 1:
            raise AssertionError("Expected op to be '==', got <")
        return real_export(model, args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.export, "export", flaky)
    model = _model(TinyResNet)
    result = mixfx.export(model, torch.randn(1, 3, 64, 80), tmp_path / "net.pt2")
    assert result.dynamic_shapes_used == "auto (fallback)" and result.verified and len(result.checks) == 3
    assert any("Dim.AUTO" in n for n in result.notes)
    assert all(d is torch.export.Dim.AUTO for d in calls[1]["x"].values())
