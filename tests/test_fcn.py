"""`mixfx.rewrite(model, to="fcn")`: a classifier's head becomes convolutions.

Ground truth comes from eager runs of the original model (crops of a larger input, forward hooks
on its feature map), never from the pass's own bookkeeping."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mixfx  # noqa: E402
from mixfx.errors import EXIT_VERIFY, MixfxError  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max()) if b.abs().max() > 0 else float((a - b).abs().max())


class OverFeatNet(nn.Module):
    """Padding-free: valid convs, floor-mode pools, flatten + Linear over a fixed 5x5 map."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class VGGNet(nn.Module):
    """VGG-style: 3x3 conv stacks, AdaptiveAvgPool2d((7, 7)), flatten, an FC stack."""

    def __init__(self, padding: int = 1, grid: int = 7):
        super().__init__()
        p = padding
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=p), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=p), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=p), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((grid, grid))
        self.classifier = nn.Sequential(
            nn.Linear(16 * grid * grid, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 32), nn.ReLU(True),
            nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.view(x.size(0), -1))


def fcn(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    return mixfx.rewrite(model.eval(), to="fcn", example_input=x)


def test_overfeat_every_position_equals_the_original_on_its_crop():
    torch.manual_seed(0)
    model = OverFeatNet().eval()
    x = torch.randn(2, 3, 54, 54)
    result = fcn(model, x)
    assert result.verification.passed
    out = result.module(x)
    assert out.shape == (2, 10, 1, 1)
    assert rel_err(out[:, :, 0, 0], model(x)) <= 1e-5
    head = result.module.get_submodule("classifier.1")
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (5, 5)
    assert torch.equal(head.weight.flatten(1), model.classifier[1].weight)  # flatten order C, h, w
    # a larger input: the map has one position per 54x54 crop at a stride of 8 pixels
    big = torch.randn(2, 3, 54 + 8 * 3, 54 + 8 * 5)
    with torch.no_grad():
        score = result.module(big)
        assert score.shape[2:] == (4, 6)
        for i in range(score.shape[2]):
            for j in range(score.shape[3]):
                crop = big[..., 8 * i:8 * i + 54, 8 * j:8 * j + 54]
                assert rel_err(score[:, :, i, j], model(crop)) <= 1e-5, (i, j)
    sm = result.score_map
    assert sm.stride == (8, 8) and sm.offset == (0, 0) and sm.padding_free
    # off the stride: one position per 5x5 window of the original's own feature map
    for h, w in ((83, 96), (61, 70)):
        with torch.no_grad():
            fmap = model.features(torch.randn(1, 3, h, w))
            size = tuple(result.module(torch.randn(1, 3, h, w)).shape[2:])
        assert size == (fmap.shape[2] - 4, fmap.shape[3] - 4)
        assert [eval(e, {}, {"H": h, "W": w}) for e in sm.output_shape[2:]] == list(size)
    assert any("padding-free" in n and "equals the original run on its crop" in n for n in result.notes)


def test_overfeat_stride_is_the_shift_that_moves_the_map_one_position():
    model = OverFeatNet().eval()
    result = fcn(model, torch.randn(1, 3, 54, 54))
    s = result.score_map.stride[0]
    big = torch.randn(1, 3, 94, 94)
    with torch.no_grad():
        a, b = result.module(big), result.module(big[..., s:, s:])
    assert torch.allclose(a[..., 1:, 1:], b, rtol=1e-5, atol=1e-6)


def test_vgg_adaptive_pool_becomes_a_fixed_pool_and_fc_stack_convs():
    torch.manual_seed(0)
    model = VGGNet(padding=0).eval()  # padding-free, so crops are the ground truth
    x = torch.randn(1, 3, 68, 68)  # feature map 14x14: adaptive (7, 7) = kernel 2, stride 2
    with torch.no_grad():
        assert model.features(x).shape[2:] == (14, 14)
    result = fcn(model, x)
    assert isinstance(result.module.get_submodule("avgpool"), nn.AvgPool2d)
    assert result.module.get_submodule("avgpool").kernel_size == (2, 2)
    convs = [result.module.get_submodule(f"classifier.{i}") for i in (0, 3, 6)]
    assert [c.kernel_size for c in convs] == [(7, 7), (1, 1), (1, 1)]
    big = torch.randn(1, 3, 68 + 8 * 2, 68 + 8 * 3)  # 4 px per feature position, 2 per pooled: 8 px
    with torch.no_grad():
        score = result.module(big)
        assert score.shape[2:] == (3, 4)
        for i in range(3):
            for j in range(4):
                crop = big[..., 8 * i:8 * i + 68, 8 * j:8 * j + 68]
                assert rel_err(score[:, :, i, j], model(crop)) <= 1e-5, (i, j)
    assert result.score_map.stride == (8, 8) and result.score_map.head_stride == (2, 2)


def test_vgg_with_padding_runs_larger_and_says_why_crops_differ():
    torch.manual_seed(0)
    model = VGGNet(padding=1).eval()
    x = torch.randn(1, 3, 56, 56)  # feature map 14x14
    result = fcn(model, x)
    assert result.verification.passed
    assert rel_err(result.module(x)[:, :, 0, 0], model(x)) <= 1e-5
    with torch.no_grad():
        score = result.module(torch.randn(1, 3, 88, 72))
    assert score.shape == (1, 10, 5, 3)  # feature map 22x18 -> pooled 11x9 -> 7x7 conv
    assert result.score_map.padded_at and not result.score_map.padding_free
    assert any("pads the crop's own borders" in n for n in result.notes)
    # the receptive field the score map reports, against perturbations of single input rows/cols
    (sy, sx), (oy, ox), (ry, rx) = result.score_map.stride, result.score_map.offset, result.score_map.receptive_field
    base = torch.randn(1, 3, 120, 120)
    with torch.no_grad():
        ref = result.module(base)
        for i, j in ((0, 0), (2, 3)):
            last_row, last_col = i * sy + oy + ry - 1, j * sx + ox + rx - 1
            for row, inside in ((last_row, True), (last_row + 1, False)):
                x = base.clone()
                x[:, :, row, :] += 100.0
                assert bool((result.module(x)[:, :, i, j] != ref[:, :, i, j]).any()) == inside, (i, j, row)
            for col, inside in ((last_col, True), (last_col + 1, False)):
                x = base.clone()
                x[:, :, :, col] += 100.0
                assert bool((result.module(x)[:, :, i, j] != ref[:, :, i, j]).any()) == inside, (i, j, col)
            if i:  # the first row of the field (offset) too, where it is inside the input
                first = i * sy + oy
                for row, inside in ((first, True), (first - 1, False)):
                    x = base.clone()
                    x[:, :, row, :] += 100.0
                    assert bool((result.module(x)[:, :, i, j] != ref[:, :, i, j]).any()) == inside, (i, j, row)


def test_uneven_adaptive_windows_are_refused_with_the_reason():
    model = VGGNet(padding=1, grid=4).eval()
    x = torch.randn(1, 3, 40, 40)  # feature map 10x10 -> 4x4: windows 3,3,3,3 at starts 0,2,5,7
    with pytest.raises(MixfxError) as info:
        fcn(model, x)
    assert info.value.exit_code == EXIT_VERIFY
    assert "avgpool" in info.value.message and "uneven" in info.value.message


def test_resnet_global_pool_map_positions_are_the_original_head_on_windows():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=20).eval()
    x = torch.randn(1, 3, 64, 96)  # layer4 is 2x3: the global pool's window
    result = fcn(model, x)
    assert result.verification.passed and result.classification_after == "convolutional"
    pool = result.module.get_submodule("avgpool")  # global pooling: a pool over the example's window
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == (2, 3) and pool.stride == (1, 1)
    with torch.no_grad():
        assert rel_err(result.module(x)[:, :, 0, 0], model(x)) <= 1e-5
        big = torch.randn(1, 3, 160, 128)
        feats = {}
        hook = model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("map", o))
        model(big)
        hook.remove()
        fmap = feats["map"]  # 5x4 -> 4x2 positions of a 2x3 window
        score = result.module(big)
        assert score.shape[2:] == (fmap.shape[2] - 1, fmap.shape[3] - 2) == (4, 2)
        for i in range(4):
            for j in range(2):
                ref = model.fc(fmap[..., i:i + 2, j:j + 3].mean((2, 3)))
                assert rel_err(score[:, :, i, j], ref) <= 1e-5
    assert result.score_map.stride == (32, 32)
    assert [eval(e, {}, {"H": 160, "W": 128}) for e in result.score_map.output_shape[2:]] == [4, 2]


class ChannelsLastHead(nn.Module):
    """timm-style NHWC pooling and per-vector ops: mean over (1, 2) of a channels-last map,
    LayerNorm, Linear + GELU, BatchNorm1d, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1).mean((1, 2))
        return self.fc2(self.bn(nn.functional.gelu(self.fc1(self.norm(x)))))


def test_channels_last_pooling_layernorm_and_batchnorm1d_heads():
    torch.manual_seed(0)
    model = ChannelsLastHead().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 24)
    result = fcn(model, x)
    big = torch.randn(2, 3, 24, 28)
    with torch.no_grad():
        score = result.module(big)
        assert score.shape == (2, 5, 3, 2)
        for i in range(3):
            for j in range(2):
                crop = big[..., 4 * i:4 * i + 16, 4 * j:4 * j + 24]
                assert rel_err(score[:, :, i, j], model(crop)) <= 1e-5


def test_vit_is_refused_naming_the_node():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    with pytest.raises(MixfxError) as info:
        fcn(model, torch.randn(1, 3, 224, 224))
    assert info.value.exit_code == EXIT_VERIFY
    assert "not convolutional" in info.value.message
    assert "blocks.0.attn" in info.value.message or "pos_embed" in info.value.message


def test_token_mixing_is_refused(example_path):
    loaded = mixfx.load_model(example_path("mlp_mixer"))
    with pytest.raises(MixfxError) as info:
        mixfx.rewrite(loaded.module, to="fcn", example_input=loaded.example_input)
    assert info.value.exit_code == EXIT_VERIFY
    assert "mlp_tokens" in info.value.message


def test_already_fully_convolutional_is_refused(example_path):
    loaded = mixfx.load_model(example_path("fcn_segmentation"))
    with pytest.raises(MixfxError) as info:
        mixfx.rewrite(loaded.module, to="fcn", example_input=loaded.example_input)
    assert info.value.exit_code == EXIT_VERIFY and "already fully convolutional" in info.value.message


def test_head_without_a_convolutional_form_is_refused_naming_the_node():
    class SortHead(nn.Module):  # sorting the features of a pooled vector: no per-window form
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.fc = nn.Linear(6 * 4 * 4, 3)

        def forward(self, x):
            v = torch.flatten(self.conv(x), 1)
            return self.fc(v.sort(dim=1).values)

    with pytest.raises(MixfxError) as info:
        fcn(SortHead(), torch.randn(1, 3, 6, 6))
    assert info.value.exit_code == EXIT_VERIFY and "sort" in info.value.message


OVERFEAT_FILE = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 54, 54)


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))
'''


def test_cli_writes_the_score_map_model_and_prints_its_geometry(tmp_path):
    from typer.testing import CliRunner

    from mixfx.cli import app

    spec = tmp_path / "overfeat.py"
    spec.write_text(OVERFEAT_FILE)
    out = tmp_path / "fcn.pt"
    res = CliRunner().invoke(app, ["rewrite", str(spec), "--to", "fcn", "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "stride 8x8" in text and "(H - 51)//8 + 1" in text and "padding-free" in text
    loaded = torch.load(out, weights_only=False)
    with torch.no_grad():
        assert loaded(torch.randn(1, 3, 70, 78)).shape == (1, 10, 3, 4)
    res = CliRunner().invoke(app, ["rewrite", str(spec), "--to", "fcn", "--json"])
    assert res.exit_code == 0
    import json

    data = json.loads(res.output)
    assert data["score_map"]["stride"] == [8, 8] and data["score_map"]["padding_free"] is True


def test_cli_refusal_exits_4(example_path):
    from typer.testing import CliRunner

    from mixfx.cli import app

    res = CliRunner().invoke(app, ["rewrite", example_path("vit_fixed_pos"), "--to", "fcn"])
    assert res.exit_code == EXIT_VERIFY
    assert "not convolutional" in " ".join(res.output.split())


def test_larger_sizes_meet_the_spatial_parts_divisibility_constraint(example_path):
    loaded = mixfx.load_model(example_path("swin_windowed"))  # needs (H//4) % 7 == 0
    model = loaded.module.eval()
    result = mixfx.rewrite(model, to="fcn", example_input=loaded.example_input)
    larger = [s.input_shape for s in result.verification.sizes[1:]]
    assert len(larger) == 2 and all(s.passed for s in result.verification.sizes)
    with torch.no_grad():
        for shape in larger:
            assert shape[2:] != loaded.example_input.shape[2:]
            model(torch.randn(shape))  # the original's spatial part accepts it (else this raises)


def test_squeeze_excite_is_global_context_so_positions_are_not_crops(example_path):
    loaded = mixfx.load_model(example_path("se_cnn"))
    result = mixfx.rewrite(loaded.module, to="fcn", example_input=loaded.example_input)
    assert result.verification.passed
    assert result.score_map.global_context and not result.score_map.padding_free
    assert any("global context" in n for n in result.notes)


def test_refuses_global_attention_even_with_analyze_false(example_path):
    loaded = mixfx.load_model(example_path("vit_interp_pos"))  # polymorphic: global attention, no rigid node
    with pytest.raises(MixfxError) as info:
        mixfx.rewrite(loaded.module, to="fcn", example_input=loaded.example_input, analyze=False)
    assert info.value.exit_code == EXIT_VERIFY and "mixes positions globally" in info.value.message


class TutorialNet(nn.Module):
    """The PyTorch CIFAR tutorial's net: `x.view(-1, 16 * 5 * 5)` folds positions into the batch
    at other sizes instead of failing."""

    def __init__(self):
        super().__init__()
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(nn.functional.relu(self.conv1(x)))
        x = self.pool(nn.functional.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))


class GlobalPoolNet(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 12, 3))
        self.pool = pool
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def crops_equal_everywhere(model: nn.Module, result, example: tuple[int, int], big: torch.Tensor) -> tuple:
    (h, w), (sy, sx) = example, result.score_map.stride
    with torch.no_grad():
        score = result.module(big)
        for i in range(score.shape[2]):
            for j in range(score.shape[3]):
                crop = big[..., sy * i:sy * i + h, sx * j:sx * j + w]
                assert crop.shape[2:] == (h, w)
                assert rel_err(score[:, :, i, j], model(crop)) <= 1e-5, (i, j)
    return tuple(score.shape[2:])


def test_tutorial_view_minus_one_head_converts():
    torch.manual_seed(0)
    model = TutorialNet().eval()
    result = fcn(model, torch.randn(2, 3, 32, 32))
    assert result.score_map.stride == (4, 4)
    assert crops_equal_everywhere(model, result, (32, 32), torch.randn(2, 3, 44, 48)) == (4, 5)


@pytest.mark.parametrize("pool", [
    Lambda(lambda x: x.mean((2, 3))),
    Lambda(lambda x: torch.amax(x, dim=(-2, -1))),
    Lambda(lambda x: x.sum(dim=(2, 3))),
    nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()),
    Lambda(lambda x: nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)),
    Lambda(lambda x: nn.functional.avg_pool2d(x, x.shape[2:]).squeeze(-1).squeeze(-1)),
    Lambda(lambda x: 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))),  # timm's avgmax
], ids=["mean", "amax", "sum", "adaptive_max", "functional_adaptive_avg", "avg_pool_full_kernel", "avgmax"])
def test_global_pools_become_stride_1_pools(pool):
    torch.manual_seed(0)
    model = GlobalPoolNet(pool).eval()
    result = fcn(model, torch.randn(1, 3, 21, 17))
    assert result.score_map.stride == (2, 2) and result.score_map.padding_free
    assert crops_equal_everywhere(model, result, (21, 17), torch.randn(1, 3, 27, 25)) == (4, 5)


def test_verification_catches_a_wrong_flatten_order():
    from mixfx.rewrite import _trace, verify_fcn
    from passes._fxutil import annotate_example_inputs, clear_example_inputs
    from passes.fcn import Convolutionalise

    torch.manual_seed(0)
    model = OverFeatNet().eval()
    x = torch.randn(1, 3, 54, 54)
    gm = _trace(model, (), x)
    annotate_example_inputs(gm, x)
    fcn_pass = Convolutionalise()
    gm = fcn_pass(gm).graph_module
    clear_example_inputs(gm)
    assert verify_fcn(model, gm, x, fcn_pass.plan)[0].passed
    conv = gm.get_submodule("classifier.1")
    with torch.no_grad():
        conv.weight.copy_(conv.weight.transpose(2, 3).clone())  # flatten order C,w,h instead of C,h,w
    verification, _ = verify_fcn(model, gm, x, fcn_pass.plan)
    assert not verification.passed and verification.max_rel_err > 1e-3
