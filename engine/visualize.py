"""What the attention blocks attend to, as one readable figure per image (PNG files and TensorBoard).

A figure shows the input large and Grad-CAM over it; then every block's spatial and query maps
upsampled onto the input in a grid, each titled with its place (stage, unit, position), its block and
what the map is, under one colour bar (each map runs from its own minimum to its maximum, which its
title gives); query maps mark their query with a white cross; channel gates as one compact strip per
block under a 0-1 colour bar.
"""
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from models.attention import ATTENTION_BLOCKS
from models.attention.maps import attention_maps, blocks_with_maps, query_index
from models.backbones.base import Backbone

MAP_COLOURS, GATE_COLOURS = "jet", "viridis"
GRID_COLUMNS = 6  # map panels per row
OUTSIDE_STAGES = {"attn_input": "input", "attn_stem": "stem", "attn_head": "head"}


@dataclass
class BlockMap:
    """One block's map of one image, with what the figure says about it."""

    place: str  # "stage 3 · unit 2 · standard"
    block: str  # the config name: "cbam"
    name: str  # the map: "spatial gate"
    kind: str  # channel | spatial | query
    values: torch.Tensor  # (C,) gates or an (h, w) map

    @property
    def title(self) -> str:
        """The panel's label: the place on one line, block and map on the next."""
        return f"{self.place}\n{self.block}: {self.name}"


def block_names() -> dict[type, str]:
    """Block class (and paper head class) -> its config name."""
    names = {}
    for name, block in ATTENTION_BLOCKS.items():
        names.setdefault(block, name)
        head = getattr(block, "head_class", None)
        if head is not None:
            names.setdefault(head, name)
    return names


def block_places(model: nn.Module) -> dict[str, str]:
    """Module name -> "stage s · unit u · position" for every block with maps (position: its slot, or the
    name of the op it stands in for); blocks outside the stages get input / stem / head, or their name."""
    places = {}
    names = {module: name for name, module in model.named_modules()}
    if isinstance(model, Backbone):
        for s in range(len(model.stages)):
            for u, unit in enumerate(model.stage_units(s), start=1):
                for path, module in unit.named_modules():
                    if module in names and path:
                        parts = path.split(".")
                        slot = next((p[len("attn_"):] for p in parts if p.startswith("attn_")), path)
                        places.setdefault(names[module], f"stage {s + 1} · unit {u} · {slot}")
    for name, _ in blocks_with_maps(model):
        top = name.split(".")[0]
        places.setdefault(name, OUTSIDE_STAGES.get(top, name))
    return places


def block_label(name: str, modules: dict[str, nn.Module], kinds: dict[type, str]) -> str:
    """The config name of the block at ``name`` or of the nearest block around it (outlook's attention sits
    inside the ``outlook`` plug-in); the class name where none is registered (VOLO's own mixer)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        kind = kinds.get(type(modules.get(".".join(parts[:end]))))
        if kind is not None:
            return kind
    return type(modules[name]).__name__


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
def collect_maps(model: nn.Module, images: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)
                 ) -> list[list[BlockMap]]:
    """Every block's maps of each of ``images`` ((B, 3, H, W) normalised inputs; the model in eval mode)."""
    places, kinds, modules = block_places(model), block_names(), dict(model.named_modules())
    with capture_block_inputs(model) as records:
        model(images)
    out: list[list[BlockMap]] = [[] for _ in range(len(images))]
    for name, block, x in records:
        label = block_label(name, modules, kinds)
        for map_name, (kind, maps) in attention_maps(block, x, query).items():
            for b in range(len(images)):
                out[b].append(BlockMap(places.get(name, name), label, map_name, kind, maps[b].float().cpu()))
    return out


def gradcam(model: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (captum's ``LayerGradCam``) of the predicted class at ``cam_layer()``: maps (B, h, w), classes (B,)."""
    with torch.no_grad():
        predicted = model(images).argmax(1)
    cam = LayerGradCam(model, model.cam_layer()).attribute(images, target=predicted, relu_attributions=True)
    return cam[:, 0].detach().float().cpu(), predicted.cpu()


FLAT = 1e-3  # a map whose range is below this share of its largest value is shown flat (scaling would show noise)


def _scaled(values: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """An (h, w) map bilinearly upsampled to ``size`` and scaled to [0, 1] between its own minimum and maximum;
    and the range as the panel says it ("0.26 to 0.6", or "constant 0.25" for a flat map, drawn as 0)."""
    low, high = float(values.min()), float(values.max())
    if high - low <= FLAT * max(abs(low), abs(high)) or high == low:
        return torch.zeros(size), f"constant {high:.3g}"
    up = F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up - low) / (high - low), f"{low:.3g} to {high:.3g}"


def _overlay(ax, image: torch.Tensor, heat: torch.Tensor, title: str, query: tuple[int, int] | None = None) -> None:
    """``heat`` (already at the image's size, in [0, 1]) blended over ``image`` (3, H, W) on ``ax``."""
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.imshow(heat.numpy(), cmap=MAP_COLOURS, alpha=0.5, vmin=0, vmax=1)
    if query is not None:
        ax.plot(query[1], query[0], marker="+", color="white", markersize=14, markeredgewidth=2.5)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def attention_figure(image: torch.Tensor, maps: list[BlockMap], cam: torch.Tensor | None = None,
                     title: str = "", query: tuple[float, float] = (0.5, 0.5)):
    """One image's figure: the input and Grad-CAM, the spatial and query maps in a grid, the channel gates.

    Args:
        image: (3, H, W) in [0, 1].
        maps: the image's ``BlockMap``s.
        cam: Grad-CAM at the cam layer's resolution (h, w), or None.
        title: e.g. the image's name and the predicted class.
        query: the query position (row, column fractions) of the query maps.
    Returns:
        A matplotlib Figure (no pyplot, so no display backend): ``savefig`` it, or hand it to TensorBoard's
        ``add_figure``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    size = tuple(image.shape[-2:])
    spatial = [m for m in maps if m.kind != "channel"]
    gates = [m for m in maps if m.kind == "channel"]
    grid_rows = math.ceil(len(spatial) / GRID_COLUMNS)
    # the layout in inches, top to bottom: title, input and Grad-CAM, the map grid, the gate strips
    left, panel, gap, title_space, strip, bar = 2.3, 1.8, 0.25, 0.6, 0.26, 0.9
    width = left + GRID_COLUMNS * (panel + gap) + bar
    height = 0.5 + (2 * panel + title_space) + grid_rows * (panel + title_space) + 0.4 + len(gates) * (strip + 0.1)
    fig = Figure(figsize=(width, height), dpi=110)

    def place(x: float, y: float, w: float, h: float):
        """An axes at (x, y) inches from the top left, w x h inches."""
        return fig.add_axes((x / width, 1 - (y + h) / height, w / width, h / height))

    y = 0.5 + title_space / 2
    ax = place(left, y, 2 * panel, 2 * panel)
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title("input", fontsize=8)
    ax.set_axis_off()
    if cam is not None:
        heat, scale = _scaled(cam, size)
        _overlay(place(left + 2 * (panel + gap), y, 2 * panel, 2 * panel), image, heat,
                 f"Grad-CAM of the predicted class ({scale})")
    y += 2 * panel + title_space
    for i, m in enumerate(spatial):
        row, col = divmod(i, GRID_COLUMNS)
        heat, scale = _scaled(m.values, size)
        marker = query_index(*size, query) if m.kind == "query" else None
        _overlay(place(left + col * (panel + gap), y + row * (panel + title_space), panel, panel), image, heat,
                 f"{m.title}\n{scale}", marker)
    if cam is not None or spatial:
        scale = ScalarMappable(Normalize(0, 1), MAP_COLOURS)  # opaque: the panels' colours before blending
        colour_bar = fig.colorbar(scale, cax=place(width - bar + 0.1, 0.5 + title_space / 2, 0.15,
                                                   y + grid_rows * (panel + title_space) - 0.5 - title_space))
        colour_bar.set_label("each map from its own minimum (0) to its maximum (1), given in its title", fontsize=7)
    y += grid_rows * (panel + title_space) + 0.2
    shown = None
    for i, m in enumerate(gates):
        ax = place(left, y + i * (strip + 0.1), GRID_COLUMNS * (panel + gap) - gap, strip)
        shown = ax.imshow(m.values.clamp(0, 1)[None].numpy(), cmap=GATE_COLOURS, vmin=0, vmax=1, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{m.place}\n{m.block}: {m.name} ({len(m.values)} channels)", rotation=0, ha="right",
                      va="center", fontsize=6)
    if shown is not None:
        colour_bar = fig.colorbar(shown, cax=place(width - bar + 0.1, y, 0.15, len(gates) * (strip + 0.1) - 0.1))
        colour_bar.set_label("channel gate", fontsize=7)
    fig.suptitle(title, fontsize=9, y=1 - 0.2 / height)
    return fig


def log_attention_figures(writer, model: nn.Module, images: torch.Tensor, display: torch.Tensor, step: int) -> None:
    """One figure per image (``attention_figure``) under ``attention/image<b>`` in TensorBoard."""
    was_training = model.training
    model.eval()
    try:
        maps = collect_maps(model, images)
        cams, predicted = gradcam(model, images)
    finally:
        model.train(was_training)
    for b, image_maps in enumerate(maps):
        fig = attention_figure(display[b].cpu(), image_maps, cams[b], f"val image {b}: predicted class {predicted[b]}")
        writer.add_figure(f"attention/image{b}", fig, step)
