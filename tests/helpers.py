"""What the tests share: the configs, data sets on disk, launching runs (train.py, the scripts, torchrun, two
nodes), waiting for and killing them, reading their results."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.overrides import TorchFunctionMode

from engine.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
register_configs()

# Small and quiet: a class-balanced slice of digits (4 steps an epoch at its batch of 64), no progress bars.
QUICK = ("data.max_train_samples=256", "data.max_val_samples=100", "trainer.progress=false")


def compose_config(*overrides: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The config train.py would see for these command-line overrides."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def steps_per_epoch(cfg: DictConfig, ranks: int = 1) -> int:
    """Optimizer steps in one epoch of ``cfg``'s training slice (a sharded sampler pads to whole shards)."""
    per_rank = -(-cfg.data.max_train_samples // ranks)
    return -(-per_rank // cfg.data.batch_size)


class _NoInitOnMeta(TorchFunctionMode):
    """Skips the in-place initialisation ops (``normal_``, ``uniform_``, ``fill_``, scalar ``mul_`` ...) on meta
    tensors: they hold no values, yet torch runs each through its Python reference implementation, most of
    a meta build's time. Every other op (``copy_`` included) still runs, and still checks shapes."""

    INIT_OPS = {"normal_", "uniform_", "zero_", "fill_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_",
                "exponential_", "log_normal_", "cauchy_", "geometric_", "random_", "bernoulli_"}
    SCALAR_OPS = {"mul_", "add_", "sub_", "div_"}  # with a number: a scale or shift of the initial values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta and (
                name in self.INIT_OPS or (name in self.SCALAR_OPS and all(
                    isinstance(a, (int, float)) for a in (*args[1:], *(kwargs or {}).values())))):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_device():
    """Build modules on the meta device, shapes only, without running their initialisation."""
    with torch.device("meta"), _NoInitOnMeta():
        yield


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run train.py as a user would; returns the finished process with its output."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
        env=env, timeout=300,
    )


def run_script(name: str, *args: str, in_process: bool = True) -> subprocess.CompletedProcess:
    """``python scripts/NAME *args``: by default in this process (its ``main(argv)``, with stdout and stderr
    captured, a ``sys.exit(message)`` turned into exit status 1 and the message on stderr, as the interpreter
    does); with ``in_process=False`` as a real process, as a user runs it."""
    if not in_process:
        # one thread, as each test worker has (tests/conftest.py): three workers on two cores already contend
        return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # where the scripts find their _config and _inputs
    spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / "scripts" / name)
    script = importlib.util.module_from_spec(spec)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        spec.loader.exec_module(script)
        try:
            status = script.main(list(args))
        except SystemExit as e:
            status = e.code
            if isinstance(status, str):
                print(status, file=sys.stderr)
                status = 1
    return subprocess.CompletedProcess([name, *args], status or 0, out.getvalue(), err.getvalue())


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 40) -> Path:
    """A tiny ImageFolder data set with random RGB PNGs in train/ and val/."""
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def corrupt_folder(root: Path) -> list[Path]:
    """A two-class folder set (8 PNGs a class and split) with a truncated JPEG, an empty file and a text
    file among the images; returns the three."""
    from PIL import Image

    make_image_folder(root, per_class=8, size=32)
    jpeg = root / "train" / "cat" / "truncated.jpg"
    Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    empty = root / "val" / "dog" / "empty.png"
    empty.write_bytes(b"")
    text = root / "val" / "cat" / "notes.png"
    text.write_text("not an image")
    return [jpeg, empty, text]


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


CHECKPOINT_EVERY = 3  # steps between the mid-epoch checkpoints of a start_torchrun run
RESUMABLE = ("data.max_val_samples=50", "data.num_workers=2", "trainer.epochs=2", "trainer.deterministic=true",
             f"trainer.checkpoint_every_steps={CHECKPOINT_EVERY}", "trainer.progress=false")


def torchrun_steps_per_epoch(nproc: int, samples: int = 128, batch: int = 16) -> int:
    """Each rank's steps in one epoch of a start_torchrun run with these arguments."""
    cfg = compose_config(*RESUMABLE, f"data.max_train_samples={samples}", f"data.batch_size={batch}")
    return steps_per_epoch(cfg, nproc)


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
