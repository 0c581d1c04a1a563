"""Backbones: every module of this package registers its own (``register_backbone``); importing it fills ``BACKBONES``."""
import importlib
import pkgutil

from models.backbones.base import BACKBONES, SMALL_OPTIONS, Backbone, PooledBackbone, register_backbone

# A new backbone file is found here: no list of modules to keep up to date.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["BACKBONES", "SMALL_OPTIONS", "Backbone", "PooledBackbone", "register_backbone"]
