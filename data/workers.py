"""How many loader processes ``data.num_workers`` means."""
import os


def loader_workers(requested: int | str) -> int:
    """``data.num_workers``: an int as given; ``auto`` the CPUs this process may use, shared by the processes
    torchrun started on this machine (so none of them asks for more workers than there are cores)."""
    if requested != "auto":
        return int(requested)
    return len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
