"""What the analysis scripts share: their own ``key=value`` arguments, the model (from a checkpoint or
the overrides) and the images (files, or the first of the configured val set)."""
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from _project import use_project

use_project()  # before the project's own imports

from _config import compose_from_argv  # noqa: E402
from data import build_datasets  # noqa: E402
from errors import DataError  # noqa: E402
from engine.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from models import ConfigError, build_model  # noqa: E402


def split_args(argv: list[str], defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The script's own ``key=value`` arguments (values parsed as YAML) and the train.py overrides left."""
    own, rest = dict(defaults), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in defaults:
            own[key] = yaml.safe_load(value)
        else:
            rest.append(arg)
    return own, rest


def load_model(overrides: list[str], checkpoint: str | None) -> tuple[nn.Module, DictConfig]:
    """The model in eval mode and its config; a checkpoint supplies the architecture and the weights."""
    cfg = compose_from_argv(overrides)
    try:
        if checkpoint:
            state = load_checkpoint(checkpoint)
            trained = OmegaConf.create(state["config"])
            cfg.model, cfg.attention, cfg.attention_extra = trained.model, trained.attention, trained.attention_extra
            cfg.data.num_classes, cfg.data.image_size = trained.data.num_classes, trained.data.image_size
            cfg.model.pretrained = None  # the checkpoint's weights replace whatever the run started from
        torch.manual_seed(cfg.seed)  # without a checkpoint: the weights a training run with this seed starts from
        model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes,
                            cfg.data.image_size)
        if checkpoint:
            model.load_state_dict(state["model"])
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    return model.eval(), cfg


def load_images(cfg: DictConfig, paths: list[str] | None, count: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str] | None]:
    """(normalised inputs, the same in [0, 1] for display, names, the class names where the data set has them):
    ``paths`` resized to the input size, else the first ``count`` images of the val set."""
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    size = cfg.data.image_size
    if paths:
        display, names = [], []
        for path in paths:
            if not Path(path).is_file():
                sys.exit(f"error: image {path} not found")
            image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
            display.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) / 255)
            names.append(Path(path).stem)
        display = torch.stack(display)
        return (display - mean) / std, display, names, list(cfg.data.classes) if cfg.data.get("classes") else None
    try:
        val_set = build_datasets(cfg.data, seed=cfg.seed)[1]
    except DataError as e:
        sys.exit(f"error: {e}")
    inputs = torch.stack([val_set[i][0] for i in range(min(count, len(val_set)))])
    classes = getattr(getattr(val_set, "dataset", val_set), "classes", None)  # a subset's data set has them
    return inputs, (inputs * std + mean).clamp(0, 1), [f"val{i}" for i in range(len(inputs))], classes
