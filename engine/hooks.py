"""Named points where a test may inject a fault; ``ATTNLAB_TEST_HOOKS`` names the module that handles them.

The engine passes a few values through ``fault_point(name, value, **context)`` (a checkpoint write, a
step's loss). With the variable unset, as in every real run, that is one cached lookup and the
value comes back unchanged; set (the test suite sets ``ATTNLAB_TEST_HOOKS=tests.faults``), the named
module's ``handle(name, value, **context)`` decides, in torchrun's workers too, which inherit it.
"""
import functools
import importlib
import os
from types import ModuleType
from typing import Any


@functools.cache
def _hooks() -> ModuleType | None:
    """The hooks module, looked up once per process (the training step calls ``fault_point``)."""
    module_name = os.environ.get("ATTNLAB_TEST_HOOKS")
    return importlib.import_module(module_name) if module_name else None


def fault_point(name: str, value: Any = None, **context: Any) -> Any:
    """``value``, or what the test hooks module returns for the point ``name``."""
    hooks = _hooks()
    return value if hooks is None else hooks.handle(name, value, **context)
