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

from engine.config import register_configs  # noqa: E402  (needs ROOT on the path)


def compose_from_argv(argv: list[str]) -> DictConfig:
    """The config ``python train.py *argv`` would run with; a bad override exits with Hydra's message."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose(config_name="train", overrides=argv)
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(f"error: {e}")
