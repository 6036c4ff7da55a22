"""Index bounds (issue 13): a fixed-size table read at indices computed from the input size runs
up to a size and fails past it; meta tensors cannot see it. Ground truth: real eager forwards at
every size around the boundary, never the analyser."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from typer.testing import CliRunner

import mixfx
from index_bound_models import GatherOwnRows, RelPosAttention, RowEmbedding
from mixfx.analysis import index_bounds
from mixfx.cli import app
from mixfx.shapes import eager_meta_forward
from verdict_models import runs_at

EXAMPLE = (1, 3, 32, 40)


def _eager_largest(model, dim: int, start: int, stop: int) -> int | None:
    """The largest size of spatial dim `dim` (the other at the example) before the first size
    at which a real forward fails, scanning every size from `start`."""
    for size in range(start, stop):
        shape = list(EXAMPLE)
        shape[2 + dim] = size
        if not runs_at(model, tuple(shape)):
            return size - 1
    return None


def _real_error(model, shape) -> str:
    with pytest.raises(Exception) as info, torch.no_grad():
        model(torch.randn(shape))
    return str(info.value)


def test_meta_forward_checks_indices_as_eager_does():
    """Past the table's end the meta forward fails with the eager forward's own error; below it
    it runs."""
    torch.manual_seed(0)
    model = RelPosAttention().eval()
    eager_meta_forward(model, (1, 3, 35, 40))
    for shape in ((1, 3, 36, 40), (1, 3, 32, 52)):
        expected = _real_error(model, shape)
        with pytest.raises(IndexError) as info:
            eager_meta_forward(model, shape)
        assert str(info.value) == expected


def test_relative_position_tables_bound_both_dims_exactly():
    torch.manual_seed(0)
    model = RelPosAttention().eval()
    largest_h = _eager_largest(model, 0, 32, 80)
    largest_w = _eager_largest(model, 1, 40, 100)
    assert (largest_h, largest_w) == (35, 51)  # the model as documented: 8 x 12 grid cells of 4 pixels
    r = mixfx.analyze(model, torch.randn(EXAMPLE))
    assert r.classification == "polymorphic", r.summary  # global attention; it runs at other sizes
    texts = [c.split(" (")[0] for c in r.constraints]
    assert f"H <= {largest_h}" in texts and f"W <= {largest_w}" in texts, r.constraints
    assert runs_at(model, (1, 3, largest_h, largest_w))  # the two bounds are independent
    assert not any(n.startswith("The index bounds are joint") for n in r.notes)
    # every size the report says runs does run, and those it says fail do fail
    for check in r.concrete_checks:
        assert runs_at(model, tuple(check.input_shape)) == check.ok, check.input_shape
    assert any(c.ok and c.input_shape != list(EXAMPLE) for c in r.concrete_checks)


def test_embedding_of_rows_bounds_height_only_and_stays_convolutional():
    torch.manual_seed(0)
    model = RowEmbedding().eval()
    largest_h = _eager_largest(model, 0, 32, 100)
    assert largest_h == 67
    assert _eager_largest(model, 1, 40, 200) is None  # any width
    r = mixfx.analyze(model, torch.randn(EXAMPLE))
    assert r.classification == "convolutional", r.summary
    bounds = [c for c in r.constraints if "index bound" in c]
    assert [c.split(" (")[0] for c in bounds] == [f"H <= {largest_h}"], r.constraints
    assert "`rows`" in bounds[0]  # the module that reads the table


def test_reads_of_its_own_map_make_no_bound():
    """The index grows with the size, and so does the tensor it reads: nothing to bound."""
    torch.manual_seed(0)
    model = GatherOwnRows().eval()
    assert runs_at(model, (1, 3, 32 * 9, 40 * 7))
    with index_bounds.collect() as reads:
        eager_meta_forward(model, EXAMPLE)
        eager_meta_forward(model, (1, 3, 64, 48))
    assert len(reads) == 2 and reads[0].high != reads[1].high  # the read is seen, and its index grows
    assert index_bounds.size_dependent(reads) == []
    r = mixfx.analyze(model, torch.randn(EXAMPLE))
    assert not [c for c in r.constraints if "index bound" in c]


def test_bound_shows_in_cli_and_json(tmp_path):
    here = pathlib.Path(__file__).parent
    spec = tmp_path / "rows.py"
    spec.write_text(f"import sys\nsys.path.insert(0, {str(here)!r})\nfrom index_bound_models import RowEmbedding\n"
                    f"INPUT_SHAPE = {EXAMPLE}\nmodel = RowEmbedding()\n")
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(spec)])
    assert res.exit_code == 0, res.output
    assert "H <= 67" in res.output
    assert all(len(line) <= 80 for line in res.output.splitlines())
    res = runner.invoke(app, ["analyze", str(spec), "--json"])
    data = json.loads(res.stdout)
    assert any(c.startswith("H <= 67 ") for c in data["constraints"])
    assert any("Index bounds: H <= 67" in n for n in data["notes"])


@pytest.mark.timm
@pytest.mark.slow
def test_mvitv2_runs_up_to_its_relative_position_tables():
    """timm's MViTv2 indexes rel_pos_h / rel_pos_w (2*56-1 rows at 224) with distances built
    from the grid: real forwards run at 224 and below and fail one pixel above."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mvitv2_tiny", pretrained=False).eval()
    assert runs_at(model, (1, 3, 224, 224)) and runs_at(model, (1, 3, 192, 160))
    assert not runs_at(model, (1, 3, 225, 224)) and not runs_at(model, (1, 3, 224, 225))
    r = mixfx.analyze(model, input_shape=(1, 3, 224, 224))
    assert r.classification == "polymorphic", r.summary
    texts = [c.split(" (")[0] for c in r.constraints]
    assert "H <= 224" in texts and "W <= 224" in texts, r.constraints
    ran = [tuple(c.input_shape) for c in r.concrete_checks if c.ok and c.input_shape != [1, 3, 224, 224]]
    assert ran and all(runs_at(model, s) for s in ran[:2])


def test_export_spec_keeps_the_bound_and_verifies_within_it():
    """torch.export's Dim gets the bound as its max, and the sizes export verifies at run eagerly."""
    from mixfx.export_shapes import derive_export_shapes

    torch.manual_seed(0)
    model = RelPosAttention().eval()
    spec = derive_export_shapes(model, torch.randn(EXAMPLE))
    assert [d.max_size for d in spec.dims] == [35, 51]
    others = spec.other_sizes()
    assert others and all(runs_at(model, s) for s in others)


def test_upper_bounds_read_back_from_constraint_texts():
    bound = index_bounds.IndexBound("H", 35, 36, "IndexError: ...", "blocks.0.attn")
    loose = index_bounds.IndexBound("W", 51, 60, "IndexError: ...")
    texts = [bound.text(), loose.text(), "H % 4 == 0"]
    assert index_bounds.upper_bounds(texts) == {"H": 35, "W": 59}


def test_a_bound_on_the_cell_count_is_said_to_be_joint():
    """h * w <= 128 cells: with W at the example (10 cells wide) H runs to 51, with H at the
    example (8 cells high) W runs to 67, and both at once fail."""
    from index_bound_models import FlatPositionTable

    torch.manual_seed(0)
    model = FlatPositionTable().eval()
    largest_h = _eager_largest(model, 0, 32, 80)
    largest_w = _eager_largest(model, 1, 40, 100)
    assert not runs_at(model, (1, 3, largest_h, largest_w))
    r = mixfx.analyze(model, torch.randn(EXAMPLE))
    texts = [c.split(" (")[0] for c in r.constraints]
    assert f"H <= {largest_h}" in texts and f"W <= {largest_w}" in texts, r.constraints
    assert any(n.startswith("The index bounds are joint") for n in r.notes), r.notes
