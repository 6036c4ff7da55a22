"""`mixfx.export` where torch gets in the way: a program torch.export specialised (an LSTM over
image rows), an op form the ONNX converter cannot translate (5-D attention), a dynamic trace
too slow to finish.

Ground truth is eager and the written file itself, run at sizes the export did not verify at."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mixfx  # noqa: E402

export_module = importlib.import_module("mixfx.export")  # `mixfx.export` itself is the function

torch.set_num_threads(1)


class RowLSTM(nn.Module):
    """Patchify by 4, then a bidirectional LSTM along each row of patches: eager runs at any
    size, but torch.export unrolls the LSTM over the W // 4 steps of the example."""

    def __init__(self, dim=4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.rnn = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * dim, 3)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        y, _ = self.rnn(x.reshape(-1, w, c))
        return self.head(y.reshape(b, h, w, -1).mean((1, 2)))


class WindowAttention(nn.Module):
    """Patchify by 4, attention inside 4x4 windows with 5-D (batch, window, head, token, dim)
    query/key/value, as Twins' and Swin-like blocks pass them."""

    def __init__(self, dim=8, ws=4):
        super().__init__()
        self.ws = ws
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        ws = self.ws
        x = x.reshape(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, ws * ws, c)
        q, k, v = self.qkv(x).reshape(b, -1, ws * ws, 3, 2, c // 2).permute(3, 0, 1, 4, 2, 5).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.head(y.mean((1, 3)).flatten(1))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def test_a_program_torch_specialised_is_narrowed_and_reported(tmp_path):
    """Eager runs the LSTM model at any width; the exported program assumes W // 4 == 8. The
    spec is narrowed to the widths the program accepts, said in a note, and the verification
    sizes meet it: the file then runs at a width inside the narrowed range it was not checked at,
    and refuses one outside."""
    model = _model(RowLSTM)
    with torch.no_grad():  # the model itself is not pinned: eager runs at other widths
        model(torch.randn(1, 3, 32, 56))
    result = mixfx.export(model, torch.randn(1, 3, 32, 32), tmp_path / "rows.pt2")
    assert result.verified and len(result.checks) == 3
    w = next(d for d in result.shapes.dims if d.name == "W")
    h = next(d for d in result.shapes.dims if d.name == "H")
    # W // 4 == 8: the widths 32..35, or 32 alone where torch's own suggested fix specialises it
    assert (w.static and w.example == 32) or (w.min_size, w.max_size) == (32, 35)
    assert not h.static and h.max_size is None  # the LSTM runs along W only: H stays open
    assert any(("narrowed" in n or "specialised" in n) and "W" in n for n in result.notes)
    assert all(w.accepts(c.input_shape[3]) for c in result.checks)
    assert len({c.input_shape[2] for c in result.checks}) == 3  # H still varied
    checked = {c.input_shape[3] for c in result.checks}
    program = torch.export.load(str(tmp_path / "rows.pt2")).module()
    unchecked = next((s for s in range(32, 36) if s not in checked and w.accepts(s)), 32)
    y = torch.randn(1, 3, 44, unchecked)
    with torch.no_grad():
        assert _close(program(y), model(y))
        with pytest.raises(Exception):  # noqa: B017 - the program's own guard refuses the width
            program(torch.randn(1, 3, 32, 40))


def test_onnx_converter_gap_is_bridged_by_decomposition(tmp_path):
    """onnxscript translates scaled_dot_product_attention for 4-D inputs only; the program is
    lowered to core ATen and converted again, and the file matches eager in onnxruntime at a
    size the export did not check."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model(WindowAttention)
    result = mixfx.export(model, torch.randn(1, 3, 32, 48), tmp_path / "win.onnx")
    assert result.verified and not result.shapes.static
    assert any("decomposing" in n and "4D" in n for n in result.notes)
    session = ort.InferenceSession(str(tmp_path / "win.onnx"), providers=["CPUExecutionProvider"])
    y = torch.randn(1, 3, 80, 16)
    assert (1, 3, 80, 16) not in {tuple(c.input_shape) for c in result.checks}
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: y.numpy()})[0])
    with torch.no_grad():
        assert _close(got, model(y))


def test_onnx_converter_failure_after_decomposition_is_a_clear_error(tmp_path, monkeypatch):
    """When the decomposed program does not convert either, the error names the converter's
    innermost reason, not its generic wrapper."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    calls = []

    def refuse(program, x, staged):
        calls.append(program)
        try:
            raise AssertionError("only 4D query, key, and value are supported")
        except AssertionError as inner:
            raise RuntimeError("Failed to convert the exported program to an ONNX model.") from inner

    monkeypatch.setattr(export_module, "_write_onnx", refuse)
    x = torch.randn(2, 3)
    program = torch.export.export(nn.Linear(3, 2), (x,))
    with pytest.raises(export_module.ExportError, match="only 4D query") as info:
        export_module._write(program, x, tmp_path / "lin.onnx", "onnx")
    assert "Failed to convert" not in str(info.value)
    assert len(calls) == 2 and calls[1] is not program  # tried again on the decomposed program


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_dynamic_export_over_its_budget_goes_static_and_says_so(tmp_path, monkeypatch):
    """A dynamic trace past its CPU budget (HaloNet's took minutes) is abandoned for a static
    export at the example size: verified there, reported, and refused at another size."""
    monkeypatch.setattr(export_module, "DYNAMIC_EXPORT_BUDGET_S", 0.001)
    model = _model(SmallCNN)
    x = torch.randn(1, 3, 32, 48)
    result = mixfx.export(model, x, tmp_path / "cnn.pt2")
    assert result.verified and result.shapes.static and result.dynamic_shapes_used == "static"
    assert [c.input_shape for c in result.checks] == [[1, 3, 32, 48]]
    assert any("CPU s" in n and "static" in n for n in result.notes)
    program = torch.export.load(str(tmp_path / "cnn.pt2")).module()
    with torch.no_grad():
        assert _close(program(x), model(x))
        with pytest.raises(Exception):  # noqa: B017 - static: another size is refused
            program(torch.randn(1, 3, 40, 48))
