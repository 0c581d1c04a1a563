"""Pure nn.Modules (backbones, attention blocks) and the one function that builds them from config."""
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from errors import ConfigError, config_message
from models.backbones import BACKBONES, Backbone
from models.placement import parse_attention_specs
from models.pretrained import load_pretrained, read_weights

log = logging.getLogger(__name__)

# Arguments build_model fills in itself rather than taking from the model config.
_BUILT_ARGS = ("name", "num_classes", "attention")


def model_options(name: str) -> list[str]:
    """The keys a ``model`` config of backbone ``name`` may set besides ``name`` (``pretrained`` on every one)."""
    params = inspect.signature(BACKBONES[name]).parameters
    return [p for p in params if p not in _BUILT_ARGS] + ["pretrained"]


def build_model(
    model: Mapping[str, Any],
    attention: Mapping[str, Any],
    attention_extra: Sequence[Mapping[str, Any]] = (),
    num_classes: int = 1000,
    image_size: int | None = None,
) -> Backbone:
    """Build a backbone with its attention blocks from plain config mappings.

    A backbone's or block's ValueError about one of its arguments is raised as a ConfigError naming
    the config key (``model.stem=...``, ``attention_extra[0].reduction=...``).

    Args:
        model: ``name`` (a key of ``BACKBONES``), the backbone's own options and ``pretrained`` (a torchvision
            or timm state-dict file, or a timm model name: see ``models.pretrained``; None: random weights).
        attention: the main attention spec (``name: none`` for a plain backbone).
        attention_extra: further specs, placed after ``attention``.
        num_classes: size of the classifier head.
        image_size: the training input's side; blocks sized by the map they see (MHSA's relative tables
            with ``max_size: null``) take that map's size from one forward pass at it. None: no pass, and
            such blocks keep their build-time size.
    """
    kwargs = dict(model)
    name = kwargs.pop("name", None)
    pretrained = kwargs.pop("pretrained", None)
    if name not in BACKBONES:
        raise ConfigError(f"model: unknown backbone '{name}'; valid names: {', '.join(BACKBONES)}")
    unknown = sorted(set(kwargs) - set(model_options(name)))
    if unknown:
        raise ConfigError(
            f"model ({name}): unknown key(s) {', '.join(unknown)}; "
            f"valid keys: name, {', '.join(model_options(name))}"
        )
    specs = parse_attention_specs(attention, attention_extra)
    try:
        built = BACKBONES[name](num_classes=num_classes, attention=specs, **kwargs)
    except ConfigError:  # already names its config key (a block's, or a placement's)
        raise
    except ValueError as e:  # the backbone's own message about one of its arguments
        raise ConfigError(config_message("model", str(e))) from None
    for spec in specs:
        kinds = tuple(k for k in (spec.block, getattr(spec.block, "head_class", None)) if k is not None)
        if not any(isinstance(m, kinds) for m in built.modules()):
            raise ConfigError(
                f"{spec.where} '{spec.name}' (stages {list(spec.stages) if spec.stages else 'all'}, position "
                f"{spec.position}) places no block on {name}: no unit there has that position; "
                "choose other stages or another position"
            )
    if image_size is not None:
        fit_to_input_size(built, image_size, kwargs.get("in_chans", 3))
    if pretrained is not None:
        weights = read_weights(str(pretrained))  # first: a bad source fails before a second model is built
        plain = BACKBONES[name](num_classes=num_classes, attention=[], **kwargs)
        report = load_pretrained(built, plain, weights, str(pretrained), built.classifier_names, name)
        log.info(report.summary(str(pretrained)))
    return built


def fit_to_input_size(model: nn.Module, image_size: int, in_chans: int = 3) -> None:
    """Call ``fit_to_map(h, w)`` on every block that has one with the map it sees at ``image_size``, found by one
    forward pass of a blank image in eval mode (BN statistics untouched)."""
    sized = [m for m in model.modules() if callable(getattr(m, "fit_to_map", None))]
    if not sized:
        return
    seen: dict[nn.Module, tuple[int, int]] = {}

    def record(block: nn.Module, args: tuple) -> None:
        """Keep the first map size ``block`` sees (returning None leaves its input as it is)."""
        seen.setdefault(block, tuple(args[0].shape[-2:]))

    handles = [m.register_forward_pre_hook(record) for m in sized]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans, image_size, image_size))
    except RuntimeError as e:  # a block that cannot take this size
        raise ConfigError(f"the model cannot run on {image_size}x{image_size} inputs ({str(e).splitlines()[0]}); "
                          "check data.image_size and model.stem") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    for block, (height, width) in seen.items():
        block.fit_to_map(height, width)


# Importing models enters every backbone in timm's registry (timm.create_model("attnlab_resnet50", ...)).
from models.timm_models import model_from_checkpoint, register_all  # noqa: E402  (needs build_model above)

register_all()

__all__ = ["BACKBONES", "Backbone", "ConfigError", "build_model", "model_from_checkpoint",
           "model_options"]  # ConfigError: from errors
