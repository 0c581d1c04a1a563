"""Checkpoints that survive a crash mid-write and load with ``weights_only=True``."""
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.hooks import fault_point


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist or cannot be loaded; the message names the path."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to a temp file beside ``path``, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fault_point("checkpoint_write")
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass trainer.resume=RUN_DIR/checkpoints/last.pt "
            "(or best.pt) of an earlier run"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable attnlab checkpoint ({first_line})") from None
    if not isinstance(state, dict) or not {"model", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is not an attnlab checkpoint (no 'model' and 'epoch' entries)")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types, so it loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by ``rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
