"""Train and evaluate an attention-augmented classifier: `python train.py [overrides]`."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from engine.config import check_config, register_configs
from engine.launcher import launcher_rank
from engine.metrics import mark_failed
from errors import USER_ERRORS, ConfigError

log = logging.getLogger("attnlab")
# A log file on a full disk must not print a traceback per line: the console keeps every line, and the
# engine's own failed write (a checkpoint, metrics.json) stops the run with one line naming the path.
logging.raiseExceptions = False

register_configs()


def short_message(error: Exception) -> str:
    """The error's own message, without the traceback a data-loader worker wraps around it."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if "Traceback" in str(error) else " ".join(lines)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Check the composed config, train, evaluate and say where the outputs are."""
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        check_config(cfg)  # before torch is imported: a bad value costs a second, not a start-up
    except ConfigError as e:
        if launcher_rank() == 0:
            mark_failed(run_dir, e)  # a sweep lists this job as failed
        return report_user_error(e, hydra_cfg.mode)
    from engine.interrupt import RunInterrupted
    from engine.record import result_line
    from engine.run import train

    try:
        metrics = train(cfg, run_dir)  # marks the run failed itself on any error
    except RunInterrupted as e:
        log.warning("%s", e)
        if e.handoff is not None:  # e.g. submitit's handler, which requeues this SLURM job
            handler, signum = e.handoff
            handler(signum, None)
        sys.exit(1)  # non-zero: torchrun --max-restarts and SLURM requeue treat the run as unfinished
    except USER_ERRORS as e:
        return report_user_error(e, hydra_cfg.mode)
    log.info("%s", result_line(metrics))
    log.info("outputs: %s | TensorBoard: tensorboard --logdir %s/tensorboard", run_dir, run_dir)


def report_user_error(error: Exception, mode: RunMode) -> None:
    """Report a user error in one line; exit non-zero, except in a sweep, which goes on to its next job."""
    log.error("error: %s", short_message(error))
    if mode != RunMode.MULTIRUN:
        sys.exit(1)


if __name__ == "__main__":
    main()
