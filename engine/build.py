"""What a run builds from its composed config before it trains: devices and processes, the model (checked
first), data, loss, optimiser, schedule and EMA, the resumed state, and metrics.json's first record."""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data import build_datasets, build_eval_loader, build_loaders, build_test_set, check_in_memory
from data.fingerprint import split_fingerprint
from engine.allocator import keep_freed_memory
from engine.checkpoint import TrainState, load_init_weights
from engine.complexity import count_macs, count_params
from engine.distributed import broadcast_object, check_sync_bn, init_distributed, seed_everything, select_device
from engine.losses import build_criterion
from engine.launcher import launcher_rank
from engine.metrics import write_json
from engine.optim import build_optimizer, build_scheduler
from engine.resumed import Resumed, check_resumed_data, restore_resumed
from engine.tensorboard import LazyWriter
from engine.trainer import Precision, StepOptions, build_precision
from errors import ConfigError
from models import Backbone, build_model

log = logging.getLogger("attnlab")


@dataclass
class Run:
    """What a run built around its training state: config, processes, data, loss, the modules that run."""

    cfg: DictConfig
    run_dir: Path
    precision: Precision
    rank: int
    world_size: int
    train_loader: Any
    val_loader: Any
    step_options: StepOptions  # loss, mixup, precision, clipping: how each training step runs
    train_model: nn.Module  # what the steps run: the model, compiled and DDP-wrapped as configured
    eval_model: nn.Module  # the same without DDP
    steps_per_epoch: int  # of a whole epoch (a resumed loader's length is what is left of its epoch)
    test_loader: Any = None  # data.val_split: the data set's own val split, evaluated once at the end
    writer: LazyWriter | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # what metrics.json holds

    @property
    def writes_outputs(self) -> bool:
        """Whether this process writes the run directory's files (rank 0)."""
        return self.rank == 0

    @property
    def checkpoints(self) -> Path:
        """The folder of ``last.pt`` and ``best.pt``."""
        return self.run_dir / "checkpoints"


def build_run(cfg: DictConfig, run_dir: Path, resumed: Resumed | None) -> tuple[Run, TrainState]:
    """Devices and processes, the model (checked first), data, loss, optimiser, schedule, EMA; resumed."""
    tcfg = cfg.trainer
    malloc = keep_freed_memory()  # before the first tensors: a step's activations reuse the heap
    device = select_device(tcfg.device)
    precision = build_precision(tcfg.amp, device)
    if launcher_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(cfg.seed, tcfg.deterministic)  # the same initial weights on every rank
    # Model first: a bad model or attention spec fails in seconds, before any process group starts
    # or any data is read.
    model, summary = _build_checked_model(cfg, weights_follow=resumed is not None or bool(tcfg.init_from))
    check_sync_bn(tcfg.sync_bn, device)
    check_in_memory(cfg.data)
    rank, world_size = init_distributed(device, tcfg.dist_timeout_s)
    if rank:
        seed_everything(cfg.seed + rank, tcfg.deterministic)  # each rank its own augmentation stream
    # Hydra computes ${now:...} in every process: all ranks write to rank 0's directory
    run_dir = Path(broadcast_object(str(run_dir)))
    continuing_here = resumed is not None and resumed.path == run_dir / "checkpoints" / "last.pt"
    if rank == 0 and not continuing_here:  # config.yaml keeps what the run started with
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    criterion, mixup = build_criterion(cfg.data, mix_token=bool(cfg.model.get("mix_token")))
    # mixup pairs samples within a batch: keep batches full
    train_loader, val_loader, test_loader, fingerprint = _build_data(cfg, resumed, rank, world_size, device,
                                                                     drop_last=mixup is not None)
    if tcfg.init_from and resumed is None:  # a resume wins
        load_init_weights(model, tcfg.init_from, tcfg.new_head)
        log.info("initialised from %s%s", tcfg.init_from, " with a new classifier" if tcfg.new_head else "")
    model, train_model, eval_model = _place_model(model, tcfg, device, world_size)
    step_options = StepOptions(criterion, precision, mixup, cfg.optim.clip_grad, tcfg.channels_last,
                               tcfg.log_interval, tcfg.on_nonfinite, progress_bar=tcfg.progress and rank == 0)
    run = Run(cfg, run_dir, precision, rank, world_size, train_loader, val_loader, step_options,
              train_model, eval_model, len(train_loader), test_loader)
    state = _build_state(cfg, model, precision, world_size, run.steps_per_epoch)
    state.data_fingerprint = fingerprint
    restore_resumed(state, resumed, world_size, tcfg.eval_only)
    run.writer = LazyWriter(str(run_dir / "tensorboard")) if run.writes_outputs else None
    # "tuned" only when both thresholds took: a partial setting is not what the speed figures measured
    _start_metrics(run, state, summary, host_malloc="tuned" if len(malloc) == 2 else "default")
    return run, state


def _build_data(cfg: DictConfig, resumed: Resumed | None, rank: int, world_size: int, device: torch.device,
                drop_last: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The train, val and test loaders of this rank, and the splits' fingerprints (a resume's are checked)."""
    train_set, val_set = build_datasets(cfg.data, seed=cfg.seed)
    fingerprint = {"train": split_fingerprint(train_set), "val": split_fingerprint(val_set)}
    check_resumed_data(resumed, fingerprint, cfg.trainer.eval_only)
    train_loader, val_loader = build_loaders(cfg.data, train_set, val_set, rank, world_size, drop_last=drop_last,
                                             seed=cfg.seed, device=device)
    test_set = build_test_set(cfg.data)
    test_loader = (None if test_set is None else
                   build_eval_loader(cfg.data, test_set, val_loader, rank, world_size, cfg.seed, device))
    if cfg.data.protocol == "final" and not cfg.trainer.eval_only:
        test_loader = val_loader  # the data set's own val split is the test set: seen once, at the end
    log.info("data %s: %d train / %d val images%s", cfg.data.name, len(train_set), len(val_set),
             f" (held out of train, data.val_split), {len(test_set)} test images" if test_set is not None else
             " (data.protocol=final: the val split is the test set, evaluated once at the end)"
             if test_loader is val_loader else "")
    return train_loader, val_loader, test_loader, fingerprint


def _start_metrics(run: Run, state: TrainState, summary: dict[str, int], host_malloc: str) -> None:
    """metrics.json from the start ("running", the model's size, the threads and the allocator setting, a
    resumed run's history), and the config keys this resume changed."""
    tcfg = run.cfg.trainer
    run.metrics = {"status": "running", "epoch": state.epoch if not tcfg.eval_only else 0, "epochs": tcfg.epochs,
                   **summary, "torch_threads": torch.get_num_threads(),  # one and two threads round differently
                   "host_malloc": host_malloc}
    if state.history:
        run.metrics.update(state.history[-1], history=state.history)
        if "top1_err" in state.history[-1]:  # evaluated every epoch (not data.protocol=final)
            run.metrics.update(best_top1_err=state.best["top1_err"], best_epoch=state.best["epoch"])
    if state.config_changes:
        run.metrics["config_changes"] = state.config_changes
        if run.writes_outputs:
            write_json(run.run_dir / "config_changes.json", {"changes": state.config_changes})
    if run.writes_outputs:
        write_json(run.run_dir / "metrics.json", run.metrics)  # "running" from the start, for anyone watching


def _place_model(model: Backbone, tcfg, device: torch.device, world_size: int
                 ) -> tuple[Backbone, nn.Module, nn.Module]:
    """SyncBN, device and memory format, compile, DDP: (the saved module, the one trained, the one evaluated)."""
    if tcfg.sync_bn and world_size > 1:  # same parameter names: checkpoints stay interchangeable
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("batch norm statistics synchronised over %d processes", world_size)
    model.to(device, memory_format=torch.channels_last if tcfg.channels_last else torch.preserve_format)
    eval_model = torch.compile(model) if tcfg.compile else model
    train_model = eval_model
    if world_size > 1:
        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=bool(model.unused_in_some_phase))
    return model, train_model, eval_model


def _build_state(cfg: DictConfig, model: Backbone, precision: Precision, world_size: int,
                 steps_per_epoch: int) -> TrainState:
    """A fresh training state: the optimiser (lr scaled to the global batch), the schedule, EMA."""
    optimizer = build_optimizer(model, cfg.optim, global_batch=cfg.data.batch_size * world_size)
    if cfg.optim.lr_reference_batch:
        log.info("lr %g: %g x global batch %d / %d", optimizer.param_groups[0]["lr"], cfg.optim.lr,
                 cfg.data.batch_size * world_size, cfg.optim.lr_reference_batch)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.trainer.epochs, steps_per_epoch,
                                model.phase_epochs(cfg.trainer.epochs))
    ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema else None
    return TrainState(model, optimizer, scheduler, precision.scaler, ema, world_size=world_size)


def _build_checked_model(cfg: DictConfig, weights_follow: bool = False) -> tuple[nn.Module, dict[str, int]]:
    """The configured model and its size; one forward pass at the input size checks it can run.

    ``weights_follow``: a resume or ``trainer.init_from`` loads the weights next, so ``model.pretrained`` is not read
    (precedence: resume > init_from > pretrained).
    """
    model_cfg = cfg.model
    if weights_follow and cfg.model.get("pretrained"):
        log.info("model.pretrained=%s not loaded: the resumed or trainer.init_from weights replace it",
                 cfg.model.pretrained)
        model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "pretrained": None}
    model = build_model(model_cfg, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)
    size = cfg.data.image_size
    try:  # a block that cannot take this size fails here, not mid-epoch
        macs = count_macs(model, (3, size, size))
    except RuntimeError as e:
        raise ConfigError(
            f"model {cfg.model.name} with attention {cfg.attention.name} cannot run on {size}x{size} "
            f"inputs ({str(e).splitlines()[0]}); check data.image_size and model.stem"
        ) from None
    summary = {"params": count_params(model), "macs": macs, "input_size": size}
    log.info("model %s + attention %s: %s params, %s MACs at %dx%d", cfg.model.name, cfg.attention.name,
             f"{summary['params']:,}", f"{summary['macs']:,}", size, size)
    return model, summary
