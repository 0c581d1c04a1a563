"""Which process this is, from its launcher's environment, before any process group (and before torch is
imported: train.py asks while it checks the config)."""
import os


def submitit_slurm_tasks() -> bool:
    """Whether this process is one of several SLURM tasks that submitit started and torchrun did not."""
    return "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SUBMITIT_FOLDER" in os.environ


def launcher_rank() -> int:
    """This process's rank as its launcher set it, before any process group: torchrun's ``RANK``, or the
    SLURM task id of a several-task job started by submitit (``engine.distributed`` exports it as RANK later)."""
    if submitit_slurm_tasks():
        return int(os.environ.get("SLURM_PROCID", 0))
    return int(os.environ.get("RANK", 0))
