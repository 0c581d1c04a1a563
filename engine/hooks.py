"""Named points where a test may inject a fault; ``ATTNLAB_TEST_HOOKS`` names the module that handles them.

The engine passes a few values through ``fault_point(name, value, **context)`` (a checkpoint write, a
step's loss). With the variable unset, as in every real run, that is one environment lookup and the
value comes back unchanged; set (the test suite sets ``ATTNLAB_TEST_HOOKS=tests.faults``), the named
module's ``handle(name, value, **context)`` decides, in torchrun's workers too, which inherit it.
"""
import importlib
import os
from types import ModuleType
from typing import Any

_modules: dict[str, ModuleType] = {}


def fault_point(name: str, value: Any = None, **context: Any) -> Any:
    """``value``, or what the test hooks module returns for the point ``name``."""
    module_name = os.environ.get("ATTNLAB_TEST_HOOKS")
    if not module_name:
        return value
    if module_name not in _modules:
        _modules[module_name] = importlib.import_module(module_name)
    return _modules[module_name].handle(name, value, **context)
