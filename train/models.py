"""Model registry: CIFAR ResNet18/34 and the custom ResNet with a norm choice, plus `timm:<name>`.

The built-in models are written for 32x32 inputs (3x3 stride-1 stems, no
ImageNet max-pool). Attribute names (`stem`/`prep`, `layer1`.., `pool`, `fc`)
are part of the contract: analysis picks Grad-CAM layers by name.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Callable, Union

import torch
from torch import nn

from beton.errors import UserError

from .airnet import airnet
from .config import ModelConfig
from .norms import NORMS

# ---------------------------------------------------------------- norms


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    return NORMS[norm]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


# ---------------------------------------------------------------- CIFAR ResNet18/34


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, four stages of BasicBlocks."""

    WIDTHS = (64, 128, 256, 512)
    STRIDES = (1, 2, 2, 2)  # torchvision's and kuangliu's layout; seed A's code ran (1, 1, 2, 2)

    def __init__(self, depths: tuple[int, ...], num_classes: int, norm: Callable[[int], nn.Module],
                 strides: tuple[int, ...] | None = None):
        super().__init__()
        strides = tuple(strides or self.STRIDES)
        if len(strides) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v in (1, 2)
                                        for v in strides):
            raise UserError(f"model.strides must be four strides of 1 or 2 (one per layer), got {list(strides)}")
        self.stem = nn.Sequential(_conv3x3(3, 64), norm(64), nn.ReLU(inplace=True))
        cin = 64
        for i, (width, stride, depth) in enumerate(zip(self.WIDTHS, strides, depths), start=1):
            blocks = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1, norm) for j in range(depth)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.pool = nn.AdaptiveAvgPool2d(1)  # whatever map remains (8x8 with strides 1, 1, 2, 2; 4x4 with 1, 2, 2, 2)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, norm: str = "batch", strides=None) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes, _norm_factory(norm), strides)


def resnet34(num_classes: int = 10, norm: str = "batch", strides=None) -> nn.Module:
    return CifarResNet((3, 4, 6, 3), num_classes, _norm_factory(norm), strides)


# ---------------------------------------------------------------- the custom ResNet


def _conv_norm_relu(cin: int, cout: int, norm: Callable[[int], nn.Module], pool: bool = False) -> nn.Sequential:
    """conv3x3 [-> MaxPool2] -> norm -> ReLU; pooling before the norm as in the assignment."""
    layers = [_conv3x3(cin, cout)] + ([nn.MaxPool2d(2)] if pool else []) + [norm(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResidualLayer(nn.Module):
    """X = conv-pool-norm-ReLU(x); out = X + ResBlock(X), the ResBlock being two conv-norm-ReLUs."""

    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv = _conv_norm_relu(cin, cout, norm, pool=True)
        self.res = nn.Sequential(_conv_norm_relu(cout, cout, norm), _conv_norm_relu(cout, cout, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.res(x)


class CustomResNet(nn.Module):
    """The course assignment's 9-conv ResNet (prep, residual, plain, residual, MaxPool(4), fc)."""

    def __init__(self, num_classes: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.prep = _conv_norm_relu(3, 64, norm)
        self.layer1 = ResidualLayer(64, 128, norm)
        self.layer2 = _conv_norm_relu(128, 256, norm, pool=True)
        self.layer3 = ResidualLayer(256, 512, norm)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def custom_resnet(num_classes: int = 10, norm: str = "batch") -> nn.Module:
    return CustomResNet(num_classes, _norm_factory(norm))


# ---------------------------------------------------------------- registry

class FastNet(nn.Module):
    """A small net for minutes-long CPU runs (what `make run` trains), shaped like airbench's.

    stem conv3x3-norm-GELU, then three blocks of conv3x3-MaxPool2-norm-GELU-conv3x3-norm-GELU
    (32 -> 16 -> 8 -> 4 pixels), global max pool, linear. About 0.7 M parameters.
    """

    WIDTHS = (24, 48, 96, 192)

    def __init__(self, num_classes: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        w = self.WIDTHS
        self.stem = nn.Sequential(_conv3x3(3, w[0]), norm(w[0]), nn.GELU())
        self.layer1, self.layer2, self.layer3 = (self._block(w[i], w[i + 1], norm) for i in range(3))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)

    @staticmethod
    def _block(cin: int, cout: int, norm) -> nn.Sequential:
        return nn.Sequential(_conv3x3(cin, cout), nn.MaxPool2d(2), norm(cout), nn.GELU(),
                             _conv3x3(cout, cout), norm(cout), nn.GELU())

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def fastnet(num_classes: int = 10, norm: str = "batch") -> nn.Module:
    return FastNet(num_classes, _norm_factory(norm))


MODELS: dict[str, Callable[[int, str], nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "custom_resnet": custom_resnet,
    "fastnet": fastnet,
    "airnet": airnet,
}

TIMM_PREFIX = "timm:"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_model(cfg: Union[ModelConfig, str], num_classes: int = 10, **fields) -> nn.Module:
    """Build the model a config names; `cfg.num_classes` wins over `num_classes` when set.

    `cfg` may also be a bare name, with ModelConfig fields as keywords:
    `create_model("resnet18", 100, norm="layer")`.
    """
    cfg = ModelConfig(name=cfg, **fields) if isinstance(cfg, str) else dataclasses.replace(cfg, **fields)
    classes = cfg.num_classes if cfg.num_classes is not None else num_classes
    if cfg.name.startswith(TIMM_PREFIX):
        return _create_timm(cfg, classes)
    if cfg.name not in MODELS:
        known = ", ".join(MODELS)
        raise UserError(f"unknown model {cfg.name!r}; known: {known}, {TIMM_PREFIX}<any timm model>")
    for flag in ("pretrained", "adapt_stem"):
        if getattr(cfg, flag):
            raise UserError(f"model.{flag} applies to timm models only, not {cfg.name}")
    fn = MODELS[cfg.name]
    if cfg.strides is not None and "strides" not in inspect.signature(fn).parameters:
        takes = ", ".join(n for n, f in MODELS.items() if "strides" in inspect.signature(f).parameters)
        raise UserError(f"model.strides applies to {takes}, not {cfg.name}")
    options = {**cfg.options, **({"strides": cfg.strides} if cfg.strides is not None else {})}
    try:
        return fn(num_classes=classes, norm=cfg.norm, **options)
    except TypeError as e:  # an option the model does not take
        raise UserError(f"model.options for {cfg.name}: {e}") from e


# ---------------------------------------------------------------- timm


def _timm_suggestions(timm, name: str) -> str:
    """Up to five timm names like the one asked for: the closest substring matches, else close spellings."""
    contained = timm.list_models(f"*{name}*")
    if contained:
        matches = difflib.get_close_matches(name, contained, n=5, cutoff=0.0)
    else:
        matches = difflib.get_close_matches(name, timm.list_models(), n=5)
    return f"; did you mean: {', '.join(TIMM_PREFIX + m for m in matches)}" if matches else ""


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed weight download raises: OSError covers huggingface_hub's cache misses,
    requests and urllib; huggingface_hub's HTTPError is httpx's, which is not an OSError."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    try:
        from huggingface_hub.errors import HTTPError

        errors += (HTTPError,)
    except ImportError:
        pass
    return errors


def _create_timm(cfg: ModelConfig, num_classes: int) -> nn.Module:
    import timm

    name = cfg.name[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}{_timm_suggestions(timm, name)}")
    if cfg.norm != "batch":
        raise UserError(f"model.norm {cfg.norm!r} cannot be used with {cfg.name}: timm models keep their own "
                        "norms (leave model.norm: batch)")
    if cfg.pretrained and not timm.is_model_pretrained(name):
        raise UserError(f"timm has no pretrained weights for {cfg.name}; set model.pretrained: false")
    try:
        model = timm.create_model(name, pretrained=cfg.pretrained, num_classes=num_classes)
    except _download_errors() as e:
        if not cfg.pretrained:
            raise
        raise UserError(f"pretrained weights for {cfg.name} could not be downloaded (offline?); put them in the "
                        "Hugging Face cache or set model.pretrained: false") from e
    if cfg.adapt_stem:
        adapt_stem(model, cfg.name)
    return model


def _stride_one(conv: nn.Conv2d) -> nn.Conv2d:
    """The same conv at stride 1: odd kernels keep their (maybe pretrained) weights with `same` padding;
    an even patchify kernel cannot be centred, so it becomes a fresh 3x3 conv."""
    if all(k % 2 == 1 for k in conv.kernel_size):
        conv.stride = (1, 1)
        conv.padding = tuple(k // 2 for k in conv.kernel_size)
        return conv
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None)


def _adapt_stem_module(stem: nn.Module) -> bool:
    """Set every strided conv in `stem` to stride 1 and drop strided pools; True if anything changed."""
    changed = False
    for parent in list(stem.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and max(child.stride) > 1:
                setattr(parent, child_name, _stride_one(child))
                changed = True
            elif isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)) and child.stride not in (1, (1, 1)):
                setattr(parent, child_name, nn.Identity())
                changed = True
    return changed


def adapt_stem(model: nn.Module, label: str) -> None:
    """Give an ImageNet model a 32x32-friendly stem in place, where the stem is recognisable.

    ResNet family (`conv1` + `maxpool`): conv1 (plain or deep stem) becomes one 3x3 stride-1
    conv to the same channels and the max-pool goes. Models with a `stem` (ConvNeXt, RegNet..):
    its strided convs run at stride 1 and its strided pools go.
    """
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):
        convs = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            model.conv1 = nn.Conv2d(convs[0].in_channels, convs[-1].out_channels, 3, padding=1, bias=False)
            model.maxpool = nn.Identity()
            return
    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Module) and _adapt_stem_module(stem):
        return
    raise UserError(f"adapt_stem is not supported for {label}")


# ---------------------------------------------------------------- CLI


def registered_counts(num_classes: int = 10) -> dict[str, int]:
    """Parameter count of every built-in model with batch norm; built on the meta device, so no memory."""
    with torch.device("meta"):
        return {name: count_parameters(build(num_classes, "batch")) for name, build in MODELS.items()}
