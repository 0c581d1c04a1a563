"""What the tests share: launching runs (train.py, torchrun, two nodes), waiting for and killing them, reading results."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def read_metrics(run_dir: Path) -> dict:
    """A run directory's metrics.json."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def torchrun(nproc: int, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N train.py *overrides`` on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_dirs(parent: Path) -> list[Path]:
    """The run directories (those with a metrics.json) under ``parent``."""
    return sorted(p.parent for p in parent.rglob("metrics.json"))


RESUMABLE = ("data.max_val_samples=50", "data.num_workers=2", "trainer.epochs=2", "trainer.deterministic=true",
             "trainer.checkpoint_every_steps=3", "trainer.progress=false")


def start_torchrun(nproc: int, run_dir: Path, env: dict[str, str], samples: int = 128, batch: int = 16,
                   overrides: tuple[str, ...] = (), launch: tuple[str, ...] = ("--standalone",)) -> subprocess.Popen:
    """A torchrun training in its own process group, so the test can SIGKILL all of it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *RESUMABLE, f"data.max_train_samples={samples}", f"data.batch_size={batch}",
           f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when_paused(proc: subprocess.Popen, marker: Path, timeout: float = 180) -> None:
    """Wait until a rank reached the pause point (it wrote ``marker``), then SIGKILL every process."""
    import time

    wait_for(marker, proc, timeout)
    time.sleep(0.5)  # the other rank reaches the same step's pause
    kill_tree(proc)  # torchrun starts each rank in its own session: the whole tree, ranks and workers


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found, frontier = [], [pid]
    while frontier:
        children = child_pids(frontier.pop())
        found += children
        frontier += children
    return found


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until a paused rank wrote ``marker`` (failing if ``proc`` ends first)."""
    import time

    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()):  # created and its pid written
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "never reached the pause point"
        time.sleep(0.2)


def two_nodes(run_dir: Path, env: dict[str, str], node1_env: dict[str, str], **kwargs) -> list[subprocess.Popen]:
    """Two torchrun agents on this machine, one process each, joined as two nodes (static rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        start_torchrun(1, run_dir, {**env, **(node1_env if node else {})}, launch=(
            "--nnodes=2", f"--node_rank={node}", "--rdzv-backend=static", "--master_addr=127.0.0.1",
            f"--master_port={port}"), **kwargs)
        for node in (0, 1)
    ]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything below it."""
    import signal

    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children
