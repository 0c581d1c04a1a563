"""How many loader processes ``data.num_workers`` means."""
import os


def loader_workers(requested: int | str) -> int:
    """``data.num_workers``: an int as given; ``auto`` the CPUs this process may use, shared by the processes
    torchrun started on this machine (so none of them asks for more workers than there are cores)."""
    if requested != "auto":
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
