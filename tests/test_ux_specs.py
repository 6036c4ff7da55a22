"""Issue 17, item 2: torchvision specs never download; build errors name their real cause."""
from __future__ import annotations

import urllib.error

import pytest
from typer.testing import CliRunner

from mixfx.cli import app

runner = CliRunner()


@pytest.fixture()
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the way it does on a machine without network."""
    torch_hub = pytest.importorskip("torch.hub")
    calls = []

    def refuse(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch_hub, "load_state_dict_from_url", refuse)
    try:  # torchvision binds its own name for it
        import torchvision.models._api as tv_api
    except ImportError:
        pass
    else:
        monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    return calls


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large"])
def test_segmentation_builders_get_no_backbone_weights(name, no_downloads):
    pytest.importorskip("torchvision")
    from mixfx.loading import load_model

    loaded = load_model(f"torchvision:{name}", meta=True)
    assert no_downloads == []
    assert loaded.input_shape == (1, 3, 224, 224)


def test_every_weights_argument_is_switched_off():
    models = pytest.importorskip("torchvision.models")
    from mixfx.loading import no_weights_kwargs

    kwargs = no_weights_kwargs(models.get_model_builder("fcn_resnet50"))
    assert kwargs == {"weights": None, "weights_backbone": None}
    assert no_weights_kwargs(models.get_model_builder("resnet18")) == {"weights": None}


def test_a_download_is_named_as_the_cause(no_downloads):
    pytest.importorskip("torchvision")
    res = runner.invoke(app, ["analyze", 'torchvision:resnet18?weights="DEFAULT"'])
    assert res.exit_code == 3, res.output
    assert "tried to download weights" in res.output and "URLError" in res.output
    assert "?weights" in res.output  # what to drop
    assert "model list" not in res.output
    assert no_downloads


def test_an_unknown_timm_kwarg_is_named():
    pytest.importorskip("timm")
    res = runner.invoke(app, ["analyze", "timm:vit_tiny_patch16_224?dynamic_mask=True"])
    assert res.exit_code == 3, res.output
    assert "does not accept the keyword argument 'dynamic_mask'" in res.output
    assert "model list" not in res.output and "Traceback" not in res.output


def test_an_unknown_name_is_named():
    pytest.importorskip("torchvision")
    res = runner.invoke(app, ["analyze", "torchvision:resnet_does_not_exist"])
    assert res.exit_code == 3
    assert "torchvision has no model called 'resnet_does_not_exist'" in res.output
