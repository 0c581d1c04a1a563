"""Train and evaluate an attention-augmented classifier: `python train.py [overrides]`."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from data import DataError
from engine.checkpoint import CheckpointError
from engine.config import register_configs
from engine.distributed import RankLostError
from engine.interrupt import RunInterrupted
from engine.run import train
from engine.trainer import NonFiniteLossError
from models import ConfigError

# Bad input the user can fix: reported in one line, without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, RankLostError)
log = logging.getLogger("attnlab")

register_configs()


def short_message(error: Exception) -> str:
    """The error's own message, without the traceback a data-loader worker wraps around it."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if "Traceback" in str(error) else " ".join(lines)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Compose the config, train, evaluate and say where the outputs are."""
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        metrics = train(cfg, run_dir)
    except RunInterrupted as e:
        log.warning("%s", e)
        if e.handoff is not None:  # e.g. submitit's handler, which requeues this SLURM job
            handler, signum = e.handoff
            handler(signum, None)
        sys.exit(1)  # non-zero: torchrun --max-restarts and SLURM requeue treat the run as unfinished
    except USER_ERRORS as e:
        log.error("error: %s", short_message(e))
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return  # the sweep goes on; this run's metrics.json says "failed"
        sys.exit(1)
    log.info("top-1 error %.2f%% (best %.2f%%) after %d epochs", metrics["top1_err"],
             metrics["best_top1_err"], metrics["epoch"])
    log.info("outputs: %s | TensorBoard: tensorboard --logdir %s/tensorboard", run_dir, run_dir)


if __name__ == "__main__":
    main()
