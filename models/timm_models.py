"""attnlab's backbones in timm's registry: ``timm.create_model("attnlab_resnet50", attention="cbam")`` builds what
``python train.py model=resnet50 attention=cbam data=imagenet`` builds.

The backbone's and the block's paper defaults come from the same files the config composes (``configs/model/``,
``configs/attention/``), so the two cannot drift. ``attention`` takes what the config takes: a block name, a spec
(a mapping with ``name`` and any of its keys) or a list of them (the first is ``attention``, the rest
``attention_extra``). timm's own keywords: ``num_classes``, ``in_chans``, ``img_size``, ``drop_rate`` (the
classifier's dropout, where the backbone has one), ``drop_path_rate`` (VOLO), ``global_pool`` (``avg`` only: the
heads average), ``pretrained_cfg`` / ``pretrained_cfg_overlay`` (input size, mean, std, crop for
``timm.data.resolve_data_config``), ``checkpoint_path`` (timm loads an attnlab checkpoint's ``model`` weights;
``load_attnlab_checkpoint`` also takes the EMA's). ``pretrained=True`` loads the ImageNet weights timm publishes
for the same architecture where there are such (``PRETRAINED``), through ``model.pretrained``; elsewhere it is
refused, naming the alternative.
"""
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models._features import FeatureGetterNet
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # configs/data/cifar10.yaml

# timm name -> (configs/model file, options it fixes, whether it is a 32x32 CIFAR network)
MODELS: dict[str, tuple[str, dict[str, Any], bool]] = {
    **{f"attnlab_resnet{d}": (f"resnet{d}", {}, False) for d in (18, 34, 50, 101, 152)},
    **{f"attnlab_resnet{d}": (f"resnet{d}", {}, True) for d in (20, 32, 44, 56, 110)},
    **{f"attnlab_mobilenetv2_{round(w * 100)}": ("mobilenetv2", {"width_mult": w}, False)
       for w in (1.4, 1.0, 0.75, 0.5, 0.35)},
    **{f"attnlab_mobilenext_{round(w * 100)}": ("mobilenext", {"width_mult": w}, False) for w in (1.4, 1.0, 0.75, 0.5)},
    **{f"attnlab_volo_d{i}": (f"volo_d{i}", {}, False) for i in range(1, 6)},
    "attnlab_densenet121": ("densenet121", {}, False),
    "attnlab_attention56": ("attention56", {}, False),
    "attnlab_attention92": ("attention92", {}, False),
}
# The ImageNet weights timm publishes for the same architecture (what ``model.pretrained`` loads by name).
PRETRAINED = {
    **{f"attnlab_resnet{d}": f"resnet{d}.tv_in1k" for d in (18, 34, 50, 101, 152)},
    "attnlab_mobilenetv2_100": "mobilenetv2_100.ra_in1k",
    "attnlab_densenet121": "densenet121.tv_in1k",
    **{f"attnlab_volo_d{i}": f"volo_d{i}_224.sail_in1k" for i in range(1, 6)},
}
# timm's keyword -> the backbone option it sets, by backbone (a keyword a backbone lacks is refused).
TIMM_KEYWORDS = {"drop_rate": ("dropout", "drop_rate"), "drop_path_rate": ("drop_path_rate",)}

default_cfgs: dict[str, dict[str, Any]] = {}  # read by timm's register_model, by the entrypoint's name


def group_config(group: str, name: str, context: Mapping[str, Any]) -> dict[str, Any]:
    """``configs/<group>/<name>.yaml`` as the config composes it: its defaults from the same group first, its
    interpolations (``${data.stem}``, ``block_defaults``) resolved against ``context``."""
    path = CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        raise ValueError(f"{group}={name} is not one of {', '.join(known)}")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    merged: dict[str, Any] = {}
    for base in raw.pop("defaults", []):
        merged.update(group_config(group, base, context) if base != "_self_" else {})
    merged.update(raw)
    root = OmegaConf.create({**context, "item": merged})
    return OmegaConf.to_container(root.item, resolve=True)


def attention_configs(attention: Any, context: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``attention`` (None, a name, a spec or a list of them) as the config's ``attention`` and ``attention_extra``."""
    specs = list(attention) if isinstance(attention, Sequence) and not isinstance(attention, str) else [attention]
    resolved = []
    for spec in specs or [None]:
        if spec is None:
            spec = "none"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(f"attention={spec!r}: give a block name, a spec with 'name', or a list of them")
        resolved.append({**group_config("attention", spec["name"], context), **spec})
    return resolved[0], resolved[1:]


def _pretrained_cfg(timm_name: str) -> dict[str, Any]:
    """The input the network was built for: size, mean, std, crop, and where timm finds its parts."""
    cifar = MODELS[timm_name][2]
    side = 32 if cifar else 224
    return {"input_size": (3, side, side), "mean": CIFAR_MEAN if cifar else IMAGENET_DEFAULT_MEAN,
            "std": CIFAR_STD if cifar else IMAGENET_DEFAULT_STD, "crop_pct": 1.0 if cifar else 0.875,
            "interpolation": "bilinear", "num_classes": 10 if cifar else 1000, "classifier": "fc",
            "license": "see docs/backbones.md"}


def _model_config(timm_name: str, side: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` config ``timm_name`` stands for, with timm's keywords turned into the backbone's options."""
    config_name, fixed, cifar = MODELS[timm_name]
    stem = kwargs.pop("stem", "cifar" if cifar else "imagenet")
    model = {**group_config("model", config_name, {"data": {"stem": stem, "image_size": side}}), **fixed}
    for keyword, options in TIMM_KEYWORDS.items():
        if keyword in kwargs:
            option = next((o for o in options if o in model), None)
            if option is None:
                raise ValueError(f"{timm_name} takes no {keyword} (none of its options {', '.join(options)})")
            model[option] = kwargs.pop(keyword)
    pool = kwargs.pop("global_pool", "avg")
    if pool != "avg":
        raise ValueError(f"{timm_name}: global_pool={pool!r}; its head averages (global_pool='avg')")
    if "img_size" not in model:
        kwargs.pop("img_size", None)  # the side blocks are fitted to (MHSA's tables), not a backbone option here
    return {**model, **kwargs}


class StageFeatures(FeatureGetterNet):
    """timm's feature wrapper over a backbone's ``forward_intermediates`` (so the input STN and what runs
    between stages still run), with the two options detection codebases set: ``frozen_stages`` (the stem and
    that many first stages get no gradient and keep their norms in eval mode; -1: none) and ``norm_eval``
    (every BatchNorm in eval mode while training, as detectors fine-tune with small per-GPU batches)."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int], frozen_stages: int = -1,
                 norm_eval: bool = False):
        super().__init__(model, out_indices, prune=False)
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        """The stem and the first ``frozen_stages`` stages (everything before the first stage counts as stem)."""
        if self.frozen_stages < 0:
            return []
        first = next(self.model.stages[0].parameters())
        stem = []
        for child in self.model.children():  # registered in network order: the stem's modules come first
            if any(p is first for p in child.parameters()):
                break
            stem.append(child)
        return stem + [self.model.stages[i] for i in range(min(self.frozen_stages, len(self.model.stages)))]

    def train(self, mode: bool = True) -> "StageFeatures":
        """Train mode, with the frozen parts' norms (and every BatchNorm under ``norm_eval``) in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self


def feature_info(model: nn.Module, in_chans: int, side: int) -> list[dict[str, Any]]:
    """Each stage's channels and reduction (timm's ``feature_info``), from one forward pass at ``side``."""
    training = model.training
    with torch.no_grad():
        maps = model.eval().forward_intermediates(torch.zeros(1, in_chans, side, side), intermediates_only=True)
    model.train(training)
    return [{"num_chs": m.shape[1], "reduction": side // m.shape[-1], "module": f"stages.{i}"}
            for i, m in enumerate(maps)]


def _entrypoint(timm_name: str):
    """timm's entrypoint for ``timm_name``: the keywords above -> the built ``Backbone`` (``features_only``: its
    ``StageFeatures``)."""

    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
               attention: Any = None, num_classes: int | None = None, features_only: bool = False,
               out_indices: Sequence[int] | None = None, frozen_stages: int = -1, norm_eval: bool = False,
               feature_cls: str | None = None, **kwargs):
        from models import build_model  # models imports this module

        cfg = resolve_pretrained_cfg(timm_name, pretrained_cfg, pretrained_cfg_overlay)
        side = int(kwargs.get("img_size") or cfg.input_size[-1])
        stem = kwargs.get("stem", "cifar" if MODELS[timm_name][2] else "imagenet")
        main, extra = attention_configs(attention, {"data": {"stem": stem, "image_size": side}})
        model = _model_config(timm_name, side, dict(kwargs))
        if pretrained:
            if timm_name not in PRETRAINED:
                raise ValueError(f"{timm_name} has no published ImageNet weights; train it here and load the run's "
                                 "checkpoint with checkpoint_path=RUN/checkpoints/last.pt")
            model["pretrained"] = PRETRAINED[timm_name]
        built = build_model(model, main, extra, num_classes or cfg.num_classes, side)
        built.pretrained_cfg = built.default_cfg = cfg.to_dict()
        built.feature_info = feature_info(built, kwargs.get("in_chans", 3), side)
        if not features_only:
            return built
        if feature_cls not in (None, "getter"):
            raise ValueError(f"{timm_name}: feature_cls={feature_cls!r}; its features come from forward_intermediates "
                             "(feature_cls='getter')")
        indices = tuple(range(len(built.stages))) if out_indices is None else tuple(out_indices)
        return StageFeatures(built, indices, frozen_stages, norm_eval)

    create.__name__ = create.__qualname__ = timm_name
    create.__module__ = __name__
    create.__doc__ = f"``{timm_name}``: attnlab's {MODELS[timm_name][0]} with the attention blocks asked for."
    return create


def register_all() -> None:
    """Enter every name of ``MODELS`` in timm's registry (timm warns once per name when it is entered again)."""
    for timm_name in MODELS:
        default_cfgs[timm_name] = _pretrained_cfg(timm_name)
        globals()[timm_name] = register_model(_entrypoint(timm_name))


def model_from_checkpoint(path: str | Path, ema: bool = False):
    """The model an attnlab checkpoint was trained as, built from the config stored in it, holding its weights
    (``ema``: the EMA copy's, where the run kept one)."""
    from models import build_model

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "config" not in saved or "model" not in saved:
        raise ValueError(f"{path} is not an attnlab checkpoint (no 'config' and 'model' entries)")
    if ema and saved.get("ema") is None:
        raise ValueError(f"{path} holds no EMA weights (the run had trainer.ema=false)")
    config = saved["config"]
    data = config["data"]
    model = build_model({**config["model"], "pretrained": None}, config["attention"], config["attention_extra"],
                        data["num_classes"], data["image_size"])
    model.load_state_dict(saved["ema"] if ema else saved["model"])
    return model.eval()
