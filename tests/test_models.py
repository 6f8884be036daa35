import json

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from beton.errors import UserError
from train.config import ModelConfig
from train.cli import models_command
from train.models import MODELS, NORMS, count_parameters, create_model

timm = pytest.importorskip("timm")


def _batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name, norm, expected", [
    ("resnet18", "batch", 11_173_962),
    ("resnet18", "layer", 11_173_962),
    ("resnet34", "batch", 21_282_122),
    ("resnet34", "layer", 21_282_122),
    ("custom_resnet", "batch", 6_573_130),
])
def test_parameter_counts(name, norm, expected):
    with torch.device("meta"):  # same constructors, no weight initialisation
        model = create_model(name, norm=norm)
    assert count_parameters(model) == expected


def test_norms_are_what_the_design_says():
    assert isinstance(NORMS["batch"](64), nn.BatchNorm2d)
    layer, group, instance = NORMS["layer"](64), NORMS["group"](48), NORMS["instance"](64)
    assert (layer.num_groups, group.num_groups, instance.num_groups) == (1, 16, 64)
    assert all(count_parameters(n) == 2 * n.num_channels for n in (layer, group, instance))


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("name", list(MODELS))
def test_one_sgd_step_trains(name, norm):
    torch.manual_seed(0)
    model = create_model(name, norm=norm)
    before = model.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(_batch()), torch.tensor([1, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shapes_and_channels_last(name):
    model = create_model(name, num_classes=100).eval()
    x = _batch(3)
    with torch.no_grad():
        plain = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert plain.shape == cl.shape == (3, 100)
    torch.testing.assert_close(plain, cl, rtol=1e-4, atol=1e-4)


def test_config_num_classes_overrides_argument():
    model = create_model(ModelConfig(name="custom_resnet", num_classes=7), num_classes=10)
    assert model.fc.out_features == 7
    assert create_model(ModelConfig(name="custom_resnet"), num_classes=10).fc.out_features == 10


def test_layer_names_for_grad_cam():
    names = dict(create_model("resnet18").named_children())
    assert ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"] == list(names)
    names = dict(create_model("custom_resnet").named_children())
    assert ["prep", "layer1", "layer2", "layer3", "pool", "fc"] == list(names)


@pytest.mark.parametrize("name, message", [
    ("resnet50", "unknown model 'resnet50'; known: resnet18, resnet34, custom_resnet, fastnet, airnet, timm:<any timm model>"),
    ("timm:resnett10", "unknown timm model 'resnett10'; did you mean: timm:resnet10t"),
])
def test_unknown_models(name, message):
    with pytest.raises(UserError, match=message):
        create_model(name)


def test_unknown_norm_and_timm_only_flags():
    with pytest.raises(UserError, match="unknown norm 'weird'"):
        create_model("resnet18", norm="weird")
    with pytest.raises(UserError, match="adapt_stem applies to timm models only"):
        create_model("resnet18", adapt_stem=True)


def test_timm_model_builds_and_adapts_its_stem():
    model = create_model("timm:resnet10t", num_classes=10)
    assert model.get_classifier().out_features == 10
    adapted = create_model(ModelConfig(name="timm:resnet10t", adapt_stem=True)).eval()
    assert adapted.conv1.stride == (1, 1) and isinstance(adapted.maxpool, nn.Identity)
    with torch.no_grad():
        assert adapted(_batch()).shape == (2, 10)
        assert adapted.forward_features(_batch()).shape[-2:] == (4, 4)  # 32 / 8: only the stages downsample


def test_timm_stem_attribute_models_adapt():
    model = create_model("timm:convnext_atto", adapt_stem=True).eval()
    assert all(max(m.stride) == 1 for m in model.stem.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        assert model(_batch()).shape == (2, 10)


def test_timm_errors():
    with pytest.raises(UserError, match="timm models keep their own norms"):
        create_model("timm:resnet10t", norm="layer")
    with pytest.raises(UserError, match="adapt_stem is not supported for timm:vit_tiny_patch16_224"):
        create_model("timm:vit_tiny_patch16_224", adapt_stem=True)


def test_pretrained_offline_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"pretrained weights for timm:resnet10t could not be downloaded \(offline\?\)"):
        create_model(ModelConfig(name="timm:resnet10t", pretrained=True))


@pytest.mark.parametrize("error", [OSError("Name or service not known"), "hub-http"])
def test_network_errors_become_user_errors(monkeypatch, error):
    if error == "hub-http":
        from huggingface_hub.errors import HTTPError

        error = HTTPError("connection refused")

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(UserError, match="put them in the Hugging Face cache or set model.pretrained: false"):
        create_model(ModelConfig(name="timm:resnet10t", pretrained=True))


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("models")(models_command)
    return app


def test_models_command_lists_counts():
    result = CliRunner().invoke(_cli(), [])
    assert result.exit_code == 0, result.output
    assert "11,173,962" in result.output and "6,573,130" in result.output and "timm:<name>" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("resnet18"))
    assert "11,173,962" in line


def test_models_command_json():
    result = CliRunner().invoke(_cli(), ["--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert counts == {"resnet18": 11_173_962, "resnet34": 21_282_122, "custom_resnet": 6_573_130,
                      "fastnet": 657_154, "airnet": 1_972_792}


def test_resnet_strides_keep_parameters_and_grad_cam_picks_layer4_at_8x8():
    from analysis.gradcam import default_layer

    for name, count in (("resnet18", 11_173_962), ("resnet34", 21_282_122)):
        for norm in ("batch", "layer"):
            model = create_model(ModelConfig(name=name, norm=norm, strides=[1, 1, 2, 2]))
            assert count_parameters(model) == count
    model = create_model(ModelConfig(name="resnet18", norm="layer", strides=[1, 1, 2, 2]))
    assert default_layer(model) == ("layer4", (8, 8))
    assert default_layer(create_model("resnet18"))[0] == "layer3"  # 4x4 at layer4 with the default strides
    with pytest.raises(UserError, match="strides"):
        create_model(ModelConfig(name="fastnet", strides=[1, 1, 2, 2]))
    with pytest.raises(UserError, match="strides"):
        create_model(ModelConfig(name="resnet18", strides=[1, 1, 2]))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_refuses_an_unknown_norm_with_the_same_line(name):
    """One norm lookup (train.models.norms.norm_layer) for every model family, airnet's included."""
    with pytest.raises(UserError, match=r"^unknown norm 'weird'; known: batch, layer, group, instance$"):
        create_model(name, norm="weird")
