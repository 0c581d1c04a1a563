"""The errors a user can fix, shared by models, data and engine; train.py reports each in one line.

Imports nothing heavy, so train.py can check a config and report a bad value before torch is loaded.
"""


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key, the value and what is allowed."""


class DataError(RuntimeError):
    """Data that cannot be loaded as configured; the message names the path and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist or cannot be loaded; the message names the path."""


class NonFiniteLossError(RuntimeError):
    """A rank's loss became NaN or infinite; every rank stops before the next checkpoint is written."""


class RankLostError(RuntimeError):
    """A collective failed: another rank died, or hung for longer than the process group's timeout."""


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory (``engine.lock``); the message names it."""


class WriteError(RuntimeError):
    """A file of the run could not be written (a full disk, a quota); the message names the path and the
    OS error. Not retried: a full disk stays full."""


# Reported by train.py in one line, without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, RankLostError, RunDirBusy, WriteError)


def config_message(path: str, message: str) -> str:
    """A module's message about one of its own arguments (``arg=value ...``) as one about the config key
    it came from (``path.arg=value ...``); any other message is prefixed with ``path: ``."""
    head = message.split("=", 1)[0]
    return f"{path}.{message}" if "=" in message and head.isidentifier() else f"{path}: {message}"
