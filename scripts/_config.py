"""Compose the training config from command-line overrides, as train.py does, for the scripts."""
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import check_config, register_configs  # noqa: E402  (needs ROOT on the path)
from errors import ConfigError  # noqa: E402


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
