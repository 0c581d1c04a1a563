"""Compose the training config from command-line overrides, as train.py does, for the scripts."""
import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from _project import use_project

ROOT = use_project()  # before the project's own imports

from engine.config import check_config, register_configs  # noqa: E402
from engine.files import write_atomically  # noqa: E402
from errors import ConfigError, WriteError  # noqa: E402


def compose_from_argv(argv: list[str]) -> DictConfig:
    """The config ``python train.py *argv`` would run with; a bad override or value exits with a one-line message."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=argv)
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(f"error: {e}")
    try:
        check_config(cfg)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return cfg


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all (``engine.files``); a failed write exits with its one-line message."""
    try:
        write_atomically(path, write, elsewhere="give the script another output directory")
    except WriteError as e:
        sys.exit(f"error: {e}")


def csv_bytes(rows: list[list]) -> bytes:
    """``rows`` as CSV, ready for ``write_file``."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode()
