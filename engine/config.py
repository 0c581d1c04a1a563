"""Structured-config schema: Hydra checks every YAML file and override against these dataclasses.

``model`` and ``attention`` vary in shape by backbone and block, so they are checked against the
constructors' signatures by ``models.build_model`` instead, still before anything is built.
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    """Data set, its transforms and loaders."""

    name: str = MISSING  # digits | cifar10 | cifar100 | imagenet | imagefolder
    root: Optional[str] = None
    num_classes: int = MISSING
    image_size: int = 32
    stem: str = "cifar"  # the model stem that suits this input size: cifar | imagenet
    mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, then center crop
    interpolation: str = "bilinear"
    download: bool = False  # torchvision format only: fetch the archive when it is absent
    batch_size: int = 128  # per process
    eval_batch_size: Optional[int] = None  # defaults to 2 x batch_size
    num_workers: int = 4  # PIL path: loader processes; in memory: processes that decode the files once
    in_memory: str = "auto"  # auto | true | false: decode once onto the device and augment whole batches there
    max_train_samples: Optional[int] = None  # class-balanced subset
    max_val_samples: Optional[int] = None
    # timm augmentation, all off by default
    randaugment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    label_smoothing: float = 0.0
    skip_corrupt: bool = False  # leave unreadable images out of their batch and report them (else: stop)
    multi_label: bool = False  # multi-hot targets: binary cross-entropy, one-error metrics
    classes: Optional[List[str]] = None  # multilabel_csv: the label vocabulary, in output order


@dataclass
class OptimConfig:
    """Optimizer (built by timm's optimizer factory)."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    no_decay_norm_bias: bool = False  # exclude norm and bias parameters from weight decay
    clip_grad: Optional[float] = None  # max global grad norm
    lr_reference_batch: Optional[int] = None  # linear scaling rule: lr x global batch / this (e.g. 256)


@dataclass
class SchedConfig:
    """Learning-rate schedule (timm's scheduler factory), stepped every iteration."""

    name: str = "cosine"  # cosine | step | none
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_epochs: List[int] = field(default_factory=list)  # step: epochs where lr is multiplied
    decay_rate: float = 0.1


@dataclass
class TrainerConfig:
    """The training loop, evaluation, precision and checkpointing."""

    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA)
    channels_last: bool = False
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    log_interval: int = 20  # steps between progress-bar and TensorBoard updates
    attention_maps: int = 0  # val images whose attention maps go to TensorBoard after each evaluation
    resume: Optional[str] = None  # checkpoint path; a run dir with checkpoints/last.pt resumes by itself
    checkpoint_every_steps: Optional[int] = None  # also checkpoint mid-epoch every N steps
    init_from: Optional[str] = None  # fine-tune: start from this checkpoint's weights (not its optimizer or epoch)
    new_head: bool = False  # with init_from: a fresh classifier for another class list
    eval_only: bool = False
    deterministic: bool = False
    sync_bn: bool = False  # with several CUDA processes: batch norm statistics over the global batch
    dist_timeout_s: float = 600  # a collective waits this long for a silent rank, then every rank stops
    on_nonfinite: str = "stop"  # a NaN/inf loss on any rank: stop every rank, or skip that update on every rank
    progress: bool = True


@dataclass
class Config:
    """The root config: one entry per group plus the seed."""

    model: Any = MISSING
    attention: Any = MISSING
    attention_extra: List[Any] = field(default_factory=list)
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    trainer: TrainerConfig = MISSING
    seed: int = 0


def register_configs() -> None:
    """Register the schema so ``configs/train.yaml`` can list it first in its defaults."""
    ConfigStore.instance().store(name="schema", node=Config)
