"""Attention maps and Grad-CAM rendered as images of the input's size (uint8 RGB arrays)."""
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from matplotlib import colormaps
from torch import nn

from models.attention.maps import attention_maps, blocks_with_maps, query_index
from models.backbones.base import Backbone


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) floats in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5,
                 query: tuple[float, float] | None = None) -> np.ndarray:
    """A (h, w) map upsampled to the (3, H, W) image, min-max scaled, coloured and blended over it.

    ``query`` (row, column fractions) marks the query position with a white cross.
    """
    _, h, w = image.shape
    heat = F.interpolate(heat[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colour = torch.from_numpy(colormaps["jet"](heat.cpu().numpy())[..., :3]).permute(2, 0, 1).float()
    out = to_uint8((1 - alpha) * image.cpu() + alpha * colour)
    if query is not None:
        i, j = query_index(h, w, query)
        arm = max(1, min(h, w) // 16)
        out[max(0, i - arm):i + arm + 1, j] = 255
        out[i, max(0, j - arm):j + arm + 1] = 255
    return out


def channel_strip(gates: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Per-channel gates (C,) as coloured vertical strips (viridis, 0 to 1) filling an image of ``size`` (H, W)."""
    h, w = size
    values = gates.float().clamp(0, 1).cpu().numpy()
    columns = np.minimum((np.arange(w) * len(values)) // w, len(values) - 1)  # image column -> channel
    row = colormaps["viridis"](values[columns])[..., :3]
    return (np.repeat(row[None], h, axis=0) * 255).round().astype(np.uint8)


@contextmanager
def capture_block_inputs(model: nn.Module) -> Iterator[list[tuple[str, nn.Module, torch.Tensor]]]:
    """Records (name, block, input) for every block with maps while the model runs."""
    records: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = [block.register_forward_pre_hook(lambda m, args, name=name: records.append((name, m, args[0].detach())))
               for name, block in blocks_with_maps(model)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def render_attention(model: nn.Module, images: torch.Tensor, display: torch.Tensor,
                     query: tuple[float, float] = (0.5, 0.5)) -> list[dict[str, np.ndarray]]:
    """Every block's maps for each image, rendered at the image's size.

    Args:
        model: in eval mode.
        images: (B, 3, H, W) normalised model inputs.
        display: the same images as (B, 3, H, W) in [0, 1] for the overlays.
    Returns:
        Per image, a dict from "<module name>: <map name>" to an (H, W, 3) uint8 image.
    """
    with capture_block_inputs(model) as records:
        model(images)
    out: list[dict[str, np.ndarray]] = [{} for _ in range(len(images))]
    for name, block, x in records:
        for map_name, (kind, maps) in attention_maps(block, x, query).items():
            for b in range(len(images)):
                key = f"{name}: {map_name}"
                if kind == "channel":
                    out[b][key] = channel_strip(maps[b], tuple(display.shape[-2:]))
                else:
                    out[b][key] = heat_overlay(display[b], maps[b], query=query if kind == "query" else None)
    return out


def render_gradcam(model: Backbone, images: torch.Tensor, display: torch.Tensor) -> list[np.ndarray]:
    """Grad-CAM (captum's ``LayerGradCam``) of the predicted class at the model's ``cam_layer()``, as overlays."""
    with torch.no_grad():
        predicted = model(images).argmax(1)
    cam = LayerGradCam(model, model.cam_layer()).attribute(images, target=predicted, relu_attributions=True)
    return [heat_overlay(display[b], cam[b, 0].detach()) for b in range(len(images))]


def log_attention_images(writer, model: nn.Module, images: torch.Tensor, display: torch.Tensor, step: int) -> None:
    """Every map-giving block's maps and Grad-CAM of ``images`` under the ``attention/`` TensorBoard tags."""
    was_training = model.training
    model.eval()
    try:
        rendered = render_attention(model, images, display)
        for per_image, cam in zip(rendered, render_gradcam(model, images, display)):
            per_image["gradcam"] = cam
    finally:
        model.train(was_training)
    for b, per_image in enumerate(rendered):
        for key, array in per_image.items():
            writer.add_image(f"attention/image{b}/{key.replace(': ', '/')}", array, step, dataformats="HWC")
