"""Exports torch.export specialises or cannot serialise: the written file is verified at sizes it
accepts, says which those are, and a `math.ceil` of sizes does not force a static export.

Ground truth: eager runs of the model and runs of the loaded file, at sizes the export's own
verification did not choose."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mixfx  # noqa: E402
from mixfx.export_shapes import fit_dim  # noqa: E402

torch.set_num_threads(1)


class UpCrop(nn.Module):
    """A strided-down, learned-up branch cropped back to its input's size and added to it
    (LowFormer's attention). Eager runs at any size; torch.export turns the crop, a no-op at
    an example whose size is even after the stem, into a guard."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)
        self.up = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.stem(x)
        h, w = y.shape[-2:]
        z = self.up(self.down(y))[..., :h, :w]
        return self.head((y + z).mean((2, 3)))


class CeilPatches(nn.Module):
    """Pads to a whole number of 2x2 patches with `math.ceil`, mixes each patch (MobileViT)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        nh, nw = math.ceil(h / 2), math.ceil(w / 2)
        y = F.pad(y, (0, 2 * nw - w, 0, 2 * nh - h))
        p = y.reshape(b, c, nh, 2, nw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, c * 4)
        p = self.mix(p).reshape(b, nh, nw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * nh, 2 * nw)
        return self.head(p[..., :h, :w].mean((2, 3)))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _eager(model, shape):
    with torch.no_grad():
        return model(torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))))


def _file_output(program, shape):
    """The loaded file's output at `shape`, None when it refuses the size."""
    try:
        with torch.no_grad():
            return program(torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))))
    except (AssertionError, RuntimeError):
        return None


def _close(a, b) -> bool:
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def test_specialised_crop_is_verified_where_the_file_runs_and_the_narrower_sizes_reported(tmp_path):
    model = _model(UpCrop)
    x = torch.randn(1, 3, 128, 96)
    assert _eager(model, (1, 3, 132, 100)) is not None  # the model itself runs off the multiples of 8
    result = mixfx.export(model, x, tmp_path / "net.pt2")
    assert result.verified and not result.shapes.static and len(result.checks) == 3
    assert any("specialised" in n for n in result.notes)
    program = torch.export.load(str(tmp_path / "net.pt2")).module()
    h, w = result.shapes.dims
    # the file refuses a size the model runs at, and the reported spec says so
    assert _file_output(program, (1, 3, 132, 96)) is None and not h.accepts(132)
    # every height the reported spec accepts in a sweep, the file runs and matches eager at
    # (W at an accepted size the verification did not use)
    accepted = [s for s in range(16, 260) if h.accepts(s)]
    assert len(accepted) >= 10
    width = next(s for s in range(112, 200) if w.accepts(s) and s not in {c.input_shape[3] for c in result.checks})
    for s in accepted:
        got = _file_output(program, (1, 3, s, width))
        assert got is not None and _close(got, _eager(model, (1, 3, s, width))), s


def test_specialised_crop_onnx_is_verified_at_the_same_accepted_sizes(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _model(UpCrop)
    x = torch.randn(1, 3, 128, 96)
    onnx = mixfx.export(model, x, tmp_path / "net.onnx")
    pt2 = mixfx.export(model, x, tmp_path / "net.pt2", shapes=onnx.shapes)
    assert onnx.verified and pt2.verified
    assert [c.input_shape for c in onnx.checks] == [c.input_shape for c in pt2.checks]
    assert all(d.accepts(c.input_shape[d.axis]) for c in onnx.checks for d in onnx.shapes.dims)


def test_math_ceil_of_sizes_is_serialised_and_the_pt2_stays_dynamic(tmp_path):
    model = _model(CeilPatches)
    x = torch.randn(1, 3, 128, 96)
    result = mixfx.export(model, x, tmp_path / "net.pt2")
    assert result.verified and not result.shapes.static
    assert any("math.ceil" in n for n in result.notes)
    loaded = torch.export.load(str(tmp_path / "net.pt2"))
    assert not any(n.target in (math.ceil, math.floor) for n in loaded.graph.nodes)
    program = loaded.module()
    h, w = result.shapes.dims
    used = {tuple(c.input_shape) for c in result.checks}
    others = [(1, 3, a, b) for a in range(40, 260) for b in range(40, 260)
              if h.accepts(a) and w.accepts(b) and a != b and (1, 3, a, b) not in used][::97][:4]
    assert others
    for shape in others:
        got = _file_output(program, shape)
        assert got is not None and _close(got, _eager(model, shape)), shape


def test_a_few_accepted_sizes_at_the_window_end_are_not_a_period():
    """MobileViT-like: (H-1)//8, //16 and //32 all odd (H in 57..64 mod 64). The class through
    the example must hold far beyond the first window, not only up to its end."""
    def ok(size: int) -> bool:
        return all(((size - 1) // s) % 2 == 1 for s in (8, 16, 32))

    fit = fit_dim("H", 2, 256, ok)
    assert fit is not None and not fit.static and fit.k_max is None
    members = [s for s in range(1, 4000) if fit.accepts(s)]
    assert 256 in members and all(ok(s) for s in members)


class ScaledPool(nn.Module):
    """Pools to `floor(0.75*H) x ceil(0.6*W)`: rounding of a float multiple of a size."""

    def forward(self, x):
        h, w = x.shape[-2:]
        a, b = math.floor(h * 0.75), math.ceil(w * 0.6)
        return F.adaptive_avg_pool2d(x, (a, b)).sum((2, 3)) + a * b


def test_rounding_of_float_multiples_of_sizes_is_serialised_exactly(tmp_path):
    from torch.export import Dim

    from mixfx.export_program import make_serialisable

    model = ScaledPool()
    program = torch.export.export(model, (torch.randn(1, 3, 40, 50),),
                                  dynamic_shapes={"x": {2: Dim.AUTO, 3: Dim.AUTO}}, strict=False)
    assert make_serialisable(program) == 2
    torch.export.save(program, str(tmp_path / "p.pt2"))
    loaded = torch.export.load(str(tmp_path / "p.pt2")).module()
    for shape in [(1, 3, 41, 53), (1, 3, 37, 29), (1, 3, 64, 71)]:  # 30.75 -> 30, 31.8 -> 32, ...
        x = torch.randn(shape)
        assert torch.equal(loaded(x), model(x)), shape
