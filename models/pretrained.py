"""ImageNet weights of torchvision and timm models loaded into attnlab's backbones (``model.pretrained``).

A source is a state-dict file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``; a checkpoint holding one under
``state_dict``, ``model`` or ``state_dict_ema`` works too) or a timm model name, whose weights timm itself
loads (offline from the local Hugging Face cache). Tensors load by name: the ResNets, DenseNet-121 and
VOLO already carry torchvision's and timm's names; MobileNetV2's ``features.N`` (torchvision) and
``blocks.S.U`` (timm) names are matched to ours in network order, tensor by tensor, shape by shape,
which both layouts share. The source must cover the plain backbone (the same model without attention
blocks) but for its classifier, else it is another architecture and is refused. Attention blocks and
the convs a block replaces keep their own initialisation; a classifier of another class count stays
freshly built.
"""
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from errors import ConfigError

# Backbone -> the sources that load into it (the docs' table; other backbones load attnlab checkpoints only).
SOURCES: dict[str, str] = {
    **{f"resnet{d}": f"torchvision `resnet{d}`, timm `resnet{d}` and its variants" for d in (18, 34, 50, 101, 152)},
    "mobilenetv2": "torchvision `mobilenet_v2`, timm `mobilenetv2_100` (width_mult 1.0)",
    "densenet121": "torchvision `densenet121`, timm `densenet121`",
    **{f"volo_d{i}": f"timm `volo_d{i}_224`" for i in range(1, 6)},
}
WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")
HUB_HOST = "huggingface.co"
NESTED = ("state_dict", "model", "state_dict_ema")  # where checkpoints of timm, attnlab and others keep weights


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: tensors loaded, the model's tensors left new, the source's skipped."""

    loaded: int = 0
    new: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self, source: str) -> str:
        """One log line."""
        def few(names: list[str]) -> str:
            return f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
        return (f"model.pretrained={source}: {self.loaded} tensors loaded, {len(self.new)} new{few(self.new)}, "
                f"{len(self.skipped)} skipped{few(self.skipped)}")


def read_weights(source: str) -> dict[str, torch.Tensor]:
    """The state dict of a weights file or of a timm model name (one-line ConfigError when it cannot be had)."""
    path = Path(source).expanduser()
    if path.suffix in WEIGHT_FILES or path.exists():
        if not path.is_file():
            raise ConfigError(f"model.pretrained={source}: no such file; give a state-dict file or a timm model name")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            weights = load_file(str(path))
        else:
            try:
                weights = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickled objects beyond tensors, or not a torch file
                raise ConfigError(f"model.pretrained={source} is not a state-dict file torch can load safely "
                                  f"({str(e).splitlines()[0][:120]})") from None
        return _unwrap(weights, source)
    return _timm_weights(source)


def _unwrap(weights: object, source: str) -> dict[str, torch.Tensor]:
    """A state dict, taken out of a checkpoint's ``state_dict`` / ``model`` entry, without DDP's ``module.``."""
    for key in NESTED:
        if isinstance(weights, Mapping) and isinstance(weights.get(key), Mapping):
            weights = weights[key]
            break
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"model.pretrained={source} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _timm_weights(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for model ``name``, through timm's own loading: from the local Hugging Face
    cache first, then from the hub where it can be reached."""
    import timm
    from huggingface_hub import constants

    if not timm.is_model(name):
        raise ConfigError(f"model.pretrained={name} is neither a file nor a timm model name; give a state-dict "
                          "file or a name timm lists (timm.list_models(pretrained=True))")
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # the cache alone: no network round trips (read at each call)
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception:
        pass  # not cached: try the hub below
    finally:
        constants.HF_HUB_OFFLINE = offline
    if offline or not _reachable(HUB_HOST):  # the hub's client would retry for most of a minute
        raise ConfigError(f"model.pretrained={name}: timm's weights are not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}) and {HUB_HOST} cannot be reached; download them once with "
                          "network, or give a state-dict file")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:
        raise ConfigError(f"model.pretrained={name}: timm could not load its weights ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); give a state-dict file") from None


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout_s``."""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_pretrained(model: nn.Module, plain: nn.Module, weights: Mapping[str, torch.Tensor], source: str,
                    classifier_names: tuple[str, ...], backbone: str) -> LoadReport:
    """Load ``weights`` into ``model`` by name, after mapping them onto ``plain`` (the same backbone without
    attention blocks); ConfigError when they are another architecture's."""
    reference = plain.state_dict()
    heads = tuple(f"{name}." for name in classifier_names)
    mapped = _onto(reference, weights, heads)
    if mapped is None:
        mismatch = _first_mismatch(reference, weights, heads)
        raise ConfigError(
            f"model.pretrained={source} holds weights of another architecture than model.name={backbone} "
            f"({mismatch}); {backbone} loads {SOURCES.get(backbone, 'attnlab checkpoints only (trainer.init_from)')}")
    own = model.state_dict()
    fits = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    return LoadReport(len(fits), [k for k in own if k not in fits], [k for k in mapped if k not in fits])


def _onto(reference: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
          heads: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """``weights`` under ``reference``'s names: by name where they agree, else in network order; None if they
    do not cover every non-classifier tensor of ``reference`` with its shape."""
    def covers(candidate: Mapping[str, torch.Tensor]) -> bool:
        return all(k in candidate and candidate[k].shape == v.shape for k, v in reference.items()
                   if not k.startswith(heads))

    if covers(weights):
        return dict(weights)
    if len(weights) == len(reference):  # the same layout under other names (MobileNetV2's)
        in_order = dict(zip(reference, weights.values()))
        if covers(in_order):
            return in_order
    return None


def _first_mismatch(reference: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                    heads: tuple[str, ...]) -> str:
    """The first tensor of ``reference`` the source lacks or has in another shape, for the error message."""
    fitting = sum(k in weights and weights[k].shape == v.shape for k, v in reference.items())
    for k, v in reference.items():
        if not k.startswith(heads) and (k not in weights or weights[k].shape != v.shape):
            found = f"{tuple(weights[k].shape)}" if k in weights else "absent"
            return f"{fitting} of {len(reference)} tensors fit; {k}: expected {tuple(v.shape)}, found {found}"
    return f"{fitting} of {len(reference)} tensors fit"
