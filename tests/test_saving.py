"""Saving rewritten modules: .pt and folder, loaded in a fresh process; atomicity and refusals."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mixfx.errors import OutputError  # noqa: E402
from mixfx.rewrite import rewrite  # noqa: E402
from mixfx.saving import load_saved, save_module  # noqa: E402


class Block(nn.Module):
    """ConvNeXt-like: after --to conv it holds a ChannelLayerNorm and a reshaped gamma."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def rewritten():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 3, 12, 16)
    return model, x, rewrite(model, "conv", x, analyze=False).module


def _fresh_process_outputs(tmp_path, saved, x):
    """Load each of `saved` in one new interpreter and run it on x (one process: torch imports are slow)."""
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from mixfx.saving import load_saved
        x = torch.load({str(tmp_path / 'x.pt')!r})
        outs = []
        for path in {[str(p) for p in saved]!r}:
            with torch.no_grad():
                outs.append(load_saved(path).eval()(x))
        torch.save(outs, {str(tmp_path / 'y.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return torch.load(tmp_path / "y.pt")


def test_pt_and_folder_load_in_fresh_process(rewritten, tmp_path):
    model, x, gm = rewritten
    pt = save_module(gm, tmp_path / "m.pt", "pt")
    folder = save_module(gm, tmp_path / "saved", "folder", example_input=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "saved"]  # no temp file/dir left
    files = sorted(p.name for p in folder.iterdir())
    assert "module.py" in files and "state_dict.pt" in files
    source = (folder / "module.py").read_text()
    assert "Conv2d(8, 16, kernel_size=(1, 1)" in source  # readable source of the convs
    assert str(tmp_path) not in source  # no absolute paths: the folder can be moved
    # the folder needs torch only (mixfx's ChannelLayerNorm was traced into plain ops)
    for pickled in folder.glob("*.pt"):
        assert b"passes.modules" not in pickled.read_bytes()
    moved = tmp_path / "moved"
    os.replace(folder, moved)
    ref = model(x).detach()
    for out in _fresh_process_outputs(tmp_path, [pt, moved], x):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(load_saved(moved)(x), ref, atol=1e-5, rtol=1e-4)


def test_refuses_to_overwrite_the_input(rewritten, tmp_path):
    _, _, gm = rewritten
    src = tmp_path / "model.py"
    src.write_text("# the user's model\n")
    with pytest.raises(OutputError, match="input model") as info:
        save_module(gm, tmp_path / "." / "model.py", "pt", input_path=src)
    assert info.value.exit_code == 5
    assert src.read_text() == "# the user's model\n"


def test_missing_and_read_only_output_folder(rewritten, tmp_path):
    _, _, gm = rewritten
    with pytest.raises(OutputError, match="does not exist"):
        save_module(gm, tmp_path / "nope" / "m.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(OutputError, match="not writable"):
            save_module(gm, ro / "m.pt")
    finally:
        ro.chmod(0o700)


def test_existing_output_is_replaced_atomically(rewritten, tmp_path):
    _, x, gm = rewritten
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    save_module(gm, target)
    assert target.read_bytes() != b"old"
    assert isinstance(torch.load(target, weights_only=False), torch.fx.GraphModule)
