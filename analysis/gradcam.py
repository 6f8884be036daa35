"""Grad-CAM (pytorch-grad-cam) on a run's model: the target layer rule and one batched CAM call.

The layer rule (docs/design.md): Grad-CAM never targets a layer whose feature map is smaller
than 5 x 5. Feature-map sizes come from forward hooks on one input of the training size
(32 x 32). The default layer is the deepest candidate whose output is at least 5 x 5,
"deepest" meaning the last to finish in the forward pass. Candidates:
- built-in models (resnet18/34, custom_resnet, fastnet): the model's direct children that
  output a 4-D tensor (stem/prep, layer1, layer2, ...), so the CAM sits on a whole stage;
- timm models: every named module that outputs a 4-D tensor (their stages live at varied
  depths); a stage container finishes after its own last block, so stages still win ties.

The CAM runs in float32 on a contiguous-format copy of the model with in-place activations
turned off, so models trained channels_last under autocast work unchanged and the hooked
activations are never overwritten. The hooks are released when the call ends.
"""
from __future__ import annotations

import copy
import difflib

import numpy as np
import torch
from torch import nn

from beton.errors import UserError

MIN_SIZE = 5  # smallest feature map (height and width) Grad-CAM may target by default
INPUT_SIZE = (32, 32)


def _methods() -> dict:
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "hirescam": pgc.HiResCAM,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
        "eigengradcam": pgc.EigenGradCAM,
        "gradcamelementwise": pgc.GradCAMElementWise,
        "scorecam": pgc.ScoreCAM,
        "ablationcam": pgc.AblationCAM,
    }


METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam",
                "gradcamelementwise", "scorecam", "ablationcam")


def method_class(name: str):
    """The pytorch-grad-cam class for a method name (case-insensitive, '-' and '_' ignored)."""
    key = name.lower().replace("-", "").replace("_", "")
    methods = _methods()
    if key not in methods:
        raise UserError(f"unknown Grad-CAM method {name!r}; known: {', '.join(METHOD_NAMES)}")
    return methods[key]


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def feature_map_sizes(model: nn.Module, names: list[str] | None = None,
                      input_size: tuple[int, int] = INPUT_SIZE) -> dict[str, tuple[int, int]]:
    """{module name: (h, w)} of the named modules (default: all) that output a 4-D tensor on one
    input of `input_size`, in the order they finish in the forward pass (for a module called
    more than once, its last call)."""
    modules = dict(model.named_modules())
    wanted = [n for n in (names if names is not None else modules) if n in modules and n != ""]
    sizes: dict[str, tuple[int, int]] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sizes.pop(name, None)  # re-insert: the order is that of the last finish
                sizes[name] = (int(output.shape[-2]), int(output.shape[-1]))
        return record

    for name in wanted:
        handles.append(modules[name].register_forward_hook(hook(name)))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sizes


def candidate_names(model: nn.Module) -> list[str] | None:
    """Names the default rule considers: direct children for built-in models, all modules for timm."""
    return None if is_timm_model(model) else [name for name, _ in model.named_children()]


def default_layer(model: nn.Module, min_size: int = MIN_SIZE) -> tuple[str, tuple[int, int]]:
    """(name, (h, w)) of the deepest candidate layer whose feature map is at least min_size x min_size."""
    sizes = feature_map_sizes(model, candidate_names(model))
    deep_enough = [(n, hw) for n, hw in sizes.items() if min(hw) >= min_size]
    if not deep_enough:
        raise UserError(f"no layer of this model has a feature map of at least {min_size}x{min_size} on "
                        f"{INPUT_SIZE[0]}x{INPUT_SIZE[1]} inputs; name one with --layer and --allow-small-layer")
    return deep_enough[-1]


def resolve_layer(model: nn.Module, name: str | None = None, allow_small: bool = False,
                  min_size: int = MIN_SIZE) -> tuple[str, tuple[int, int]]:
    """The Grad-CAM target: the default rule's layer, or `name` checked against the 5x5 rule."""
    if name is None:
        return default_layer(model, min_size)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        stages = [n for n, _ in model.named_children()]
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown layer {name!r}; {hint}top-level layers: {', '.join(stages[:12])}")
    sizes = feature_map_sizes(model, [name])
    if name not in sizes:
        raise UserError(f"layer {name!r} does not output a feature map (a 4-D tensor); pick a conv stage "
                        f"such as {default_layer(model, min_size)[0]}")
    hw = sizes[name]
    if min(hw) < min_size and not allow_small:
        raise UserError(f"layer {name!r} has a {hw[0]}x{hw[1]} feature map, smaller than {min_size}x{min_size}: "
                        f"its Grad-CAM is too coarse to read; use {default_layer(model, min_size)[0]} (the default) "
                        f"or add --allow-small-layer")
    return name, hw


def cam_model(model: nn.Module) -> nn.Module:
    """A float32, contiguous-format, eval-mode copy of `model` with in-place activations off."""
    model = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format).eval()
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def compute_cams(model: nn.Module, layer: str, inputs: torch.Tensor, target_classes,
                 method: str = "gradcam") -> np.ndarray:
    """Grad-CAMs (N x H x W float32 in [0, 1]) of `inputs` (N x 3 x H x W, normalised) for the
    given target classes, at `layer` of `model`, in ONE batched pytorch-grad-cam call.

    `model` should be a `cam_model` copy; its hooks are released before returning.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(inputs) == 0:
        return np.zeros((0, *inputs.shape[-2:]), dtype=np.float32)
    module = dict(model.named_modules())[layer]
    param = next(model.parameters())
    x = inputs.to(device=param.device, dtype=torch.float32).contiguous()
    targets = [ClassifierOutputTarget(int(c)) for c in target_classes]
    cam = method_class(method)(model=model, target_layers=[module])
    try:
        with torch.enable_grad():
            grayscale = cam(input_tensor=x, targets=targets)
    finally:
        cam.activations_and_grads.release()  # removes the forward hooks
        model.zero_grad(set_to_none=True)
    return np.asarray(grayscale, dtype=np.float32)


def overlays(images: np.ndarray, cams: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """RGB uint8 overlays of CAMs (N x H x W in [0, 1]) on uint8 RGB images (N x H x W x 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    out = [show_cam_on_image(img.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=image_weight)
           for img, cam in zip(images, cams)]
    return np.stack(out) if out else np.zeros((0, *images.shape[1:]), dtype=np.uint8)


def upscale_cams(cams: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upscaling of N x H x W CAMs (a smooth heatmap over nearest-upscaled pixels)."""
    if len(cams) == 0 or factor == 1:
        return cams
    t = torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32))[:, None]
    up = torch.nn.functional.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False)
    return up[:, 0].clamp_(0, 1).numpy()
