"""`timm:<name>`: any timm model, optionally pretrained, with a 32x32-friendly stem on request (`adapt_stem`)."""
from __future__ import annotations

import difflib

from torch import nn

from beton.errors import UserError

from ..config import ModelConfig

TIMM_PREFIX = "timm:"


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


def create_timm_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
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
