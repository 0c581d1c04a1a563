"""Structured-config schema: Hydra checks every YAML file and override against these dataclasses (keys
and types); ``check_config`` checks the values against ``RULES`` (ranges and allowed names).

``model`` and ``attention`` vary in shape by backbone and block: their common numeric keys are checked
here, their names, positions and stages by ``models.build_model`` against the constructors, still
before anything is built. Imports nothing heavy: train.py checks a config before torch is loaded.
"""
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from choices import DECODE_CHOICES, IN_MEMORY_CHOICES, NORMS, STEMS
from errors import ConfigError

# The allowed values of the enumerated keys (tests/test_configs.py checks that the code accepts exactly these).
DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "imagefolder", "multilabel_csv")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "linear", "step", "exponential", "none")
ERASING_MODES = ("pixel", "rand", "const")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("none", "bf16", "fp16")
NONFINITE_ACTIONS = ("stop", "skip")
PROTOCOLS = ("standard", "selection", "final")


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
    # PIL path: loader processes; in memory: processes that decode the files once. auto: the CPUs this
    # process may use over the processes on this machine (LOCAL_WORLD_SIZE)
    num_workers: Any = "auto"
    in_memory: str = "auto"  # auto | true | false: decode once onto the device and augment whole batches there
    # per-image loading: cpu (PIL in the workers) | gpu (workers read bytes, the device decodes JPEGs and
    # crops; on a machine without CUDA the same code on the CPU) | auto (gpu where CUDA is and the recipe allows)
    decode: str = "auto"
    max_train_samples: Optional[int] = None  # class-balanced subset
    max_val_samples: Optional[int] = None
    # hold out N class-balanced train images as the val set (best.pt, every choice); the data set's own
    # val split is then the test set, evaluated once with the final weights (e.g. CIFAR's 45k/5k split: 5000)
    val_split: int = 0
    # how the splits are used: standard (val each epoch; with val_split the test set once at the end) |
    # selection (train on the rest of val_split's hold-out, evaluate the hold-out each epoch, never load the
    # test set) | final (train on every train image, no per-epoch evaluation and no best.pt; the data set's
    # own val split is the test set, evaluated once with the final weights)
    protocol: str = "standard"
    # timm augmentation, all off by default
    randaugment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"  # random erasing fill: pixel (per-pixel noise, timm's scripts and VOLO's) | rand | const
    color_jitter: float = 0.0  # ImageNet recipe: timm's colour jitter strength; 0 is crop + flip alone, as
    # the SE, CBAM, ECA and CA scripts train (timm's factory would add 0.4); RandAugment replaces it
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

    name: str = "cosine"  # cosine | linear (to min_lr) | step | exponential (lr x decay_rate every epoch) | none
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_epochs: List[int] = field(default_factory=list)  # step: epochs where lr is multiplied
    decay_rate: float = 0.1
    cooldown_epochs: int = 0  # the last epochs at min_lr, after the schedule (timm's; VOLO's 10 of 310)


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
    # stop this process after N epochs, as an interrupt would (a checkpoint, status "stopped"); the same
    # command without it resumes: scripts/run_record.py check replays a schedule's first epochs this way
    stop_after_epochs: Optional[int] = None


@dataclass
class Config:
    """The root config: one entry per group plus the seed."""

    model: Any = MISSING
    attention: Any = MISSING
    attention_extra: List[Any] = field(default_factory=list)
    # a recipe's own defaults for blocks the user may pick: block_defaults.se.reduction=24 makes
    # attention=se build at r = 24 under that recipe (the block yamls read them through oc.select)
    block_defaults: Dict[str, Any] = field(default_factory=dict)
    # a recipe's published numbers: {source, metric (top1_err), key (the config key they vary with, e.g.
    # attention.reduction), values: [[that key's value, number], ...] (a list: a recipe deriving from
    # another replaces it whole)}; saved with each run, never a varied key
    paper: Optional[Dict[str, Any]] = None
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    trainer: TrainerConfig = MISSING
    seed: int = 0


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, as checkpoints store it."""
    return OmegaConf.to_container(cfg, resolve=True)


def register_configs() -> None:
    """Register the schema so ``configs/train.yaml`` can list it first in its defaults."""
    ConfigStore.instance().store(name="schema", node=Config)


@dataclass(frozen=True)
class Rule:
    """What a key accepts: a test of its value and the words that say what is allowed."""

    accepts: Callable[[Any], bool]
    allowed: str


def _number(value: Any) -> bool:
    """A real number (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    """An integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


POSITIVE_INT = Rule(lambda v: _integer(v) and v >= 1, "an integer >= 1")
NON_NEGATIVE_INT = Rule(lambda v: _integer(v) and v >= 0, "an integer >= 0")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "a number >= 0")
PROBABILITY = Rule(lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
BELOW_ONE = Rule(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")  # [0, 1): momentum, decays
BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
NON_ZERO_INT = Rule(lambda v: _integer(v) and v != 0, "a non-zero integer")


def one_of(names: tuple[str, ...]) -> Rule:
    """One of ``names``, exactly; a boolean as its lower-case text (Hydra reads a bare true/false as one, and
    a string-typed key then holds "True" or "False")."""
    return Rule(lambda v: v in names or (str(v) in ("True", "False") and str(v).lower() in names),
                f"one of {', '.join(names)}")


def optional(rule: Rule) -> Rule:
    """``rule`` or null."""
    return Rule(lambda v: v is None or rule.accepts(v), f"{rule.allowed}, or null")


def list_of(rule: Rule, length: int | None = None) -> Rule:
    """A list of values that each pass ``rule`` (of ``length`` items, when given)."""
    size = f"{length} " if length else ""
    return Rule(lambda v: isinstance(v, (list, tuple)) and (length is None or len(v) == length)
                and all(rule.accepts(x) for x in v), f"a list of {size}values, each {rule.allowed}")


RULES: dict[str, Rule] = {
    "seed": Rule(lambda v: _integer(v) and 0 <= v < 2**31, "an integer in [0, 2^31)"),  # numpy takes < 2^32, less the rank
    "data.name": one_of(DATASETS),
    "data.num_classes": POSITIVE_INT,
    "data.image_size": POSITIVE_INT,
    "data.stem": one_of(STEMS),
    "data.mean": list_of(Rule(_number, "a number"), 3),
    "data.std": list_of(POSITIVE, 3),
    "data.crop_pct": Rule(lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "data.interpolation": one_of(INTERPOLATIONS),
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": optional(POSITIVE_INT),
    "data.num_workers": Rule(lambda v: v == "auto" or NON_NEGATIVE_INT.accepts(v), "auto or an integer >= 0"),
    "data.in_memory": one_of(IN_MEMORY_CHOICES),
    "data.decode": one_of(DECODE_CHOICES),
    "data.max_train_samples": optional(POSITIVE_INT),
    "data.max_val_samples": optional(POSITIVE_INT),
    "data.val_split": NON_NEGATIVE_INT,
    "data.protocol": one_of(PROTOCOLS),
    "data.randaugment": optional(Rule(lambda v: isinstance(v, str) and v.split("-")[0] == "rand",
                                      "timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1")),
    "data.reprob": PROBABILITY,
    "data.remode": one_of(ERASING_MODES),
    "data.color_jitter": NON_NEGATIVE,
    "data.mixup": NON_NEGATIVE,
    "data.cutmix": NON_NEGATIVE,
    "data.label_smoothing": BELOW_ONE,
    "optim.name": one_of(OPTIMIZERS),
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": BELOW_ONE,
    "optim.betas": list_of(BELOW_ONE, 2),
    "optim.clip_grad": optional(POSITIVE),
    "optim.lr_reference_batch": optional(POSITIVE_INT),
    "sched.name": one_of(SCHEDULES),
    "sched.warmup_epochs": NON_NEGATIVE_INT,
    "sched.warmup_lr": NON_NEGATIVE,
    "sched.min_lr": NON_NEGATIVE,
    "sched.decay_epochs": Rule(lambda v: list_of(POSITIVE_INT).accepts(v) and list(v) == sorted(set(v)),
                               "a list of increasing integers >= 1"),
    "sched.decay_rate": POSITIVE,
    "sched.cooldown_epochs": NON_NEGATIVE_INT,
    "trainer.epochs": POSITIVE_INT,
    "trainer.device": one_of(DEVICES),
    "trainer.amp": one_of(AMP_MODES),
    "trainer.ema_decay": BELOW_ONE,
    "trainer.log_interval": POSITIVE_INT,
    "trainer.attention_maps": NON_NEGATIVE_INT,
    "trainer.checkpoint_every_steps": optional(POSITIVE_INT),
    "trainer.dist_timeout_s": POSITIVE,
    "trainer.on_nonfinite": one_of(NONFINITE_ACTIONS),
    "trainer.stop_after_epochs": optional(POSITIVE_INT),
}

# Keys of some backbones and blocks, checked wherever a model config or an attention spec has them.
MODEL_RULES: dict[str, Rule] = {
    "stem": one_of(STEMS), "norm": one_of(NORMS), "norm_groups": POSITIVE_INT, "width_mult": POSITIVE,
    "img_size": POSITIVE_INT, "drop_rate": PROBABILITY, "drop_path_rate": PROBABILITY, "dropout": PROBABILITY,
    "in_chans": POSITIVE_INT, "tau": BELOW_ONE, "width": POSITIVE_INT, "mix_token": BOOLEAN,
    "pretrained": Rule(lambda v: v is None or (isinstance(v, str) and v != ""),
                       "a state-dict file, a timm model name or null"),
}
ATTENTION_RULES: dict[str, Rule] = {
    **{key: POSITIVE_INT for key in ("reduction", "every", "recurrence", "min_width",
                                     "hidden", "divisor", "stride")},
    **{key: optional(POSITIVE_INT) for key in ("kernel_size", "max_size", "levels", "heads", "head_width")},
    "padding": NON_NEGATIVE_INT, "e_lambda": POSITIVE,
    "scale": optional(POSITIVE), "init_std": optional(POSITIVE), "gamma": POSITIVE, "b": Rule(_number, "a number"),
    "units": Rule(lambda v: v is None or (_integer(v) and v != 0) or list_of(NON_ZERO_INT).accepts(v),
                  "a non-zero integer or a list of them (negative: from the stage's end), or null"),
    "by_stage": Rule(lambda v: v is None or isinstance(v, dict), "a mapping {key: [one value per stage]}, or null"),
    **{key: BOOLEAN for key in ("bias", "spatial", "subsample", "rel_pos", "qkv_bias", "scaled")},
}

# Rules across keys: (the keys, whether their values go together, what is allowed).
JOINT_RULES: list[tuple[tuple[str, ...], Callable[..., bool], str]] = [
    (("sched.warmup_epochs", "trainer.epochs"), lambda warmup, epochs: warmup <= epochs,
     "no more warm-up epochs than trainer.epochs"),
    (("sched.warmup_epochs", "sched.cooldown_epochs", "trainer.epochs"),
     lambda warmup, cooldown, epochs: warmup + cooldown < epochs,
     "fewer warm-up plus cool-down epochs than trainer.epochs"),
    (("sched.cooldown_epochs", "sched.name"), lambda cooldown, name: cooldown == 0 or name in ("cosine", "linear"),
     "sched.cooldown_epochs with sched=cosine or linear only (step schedules have no floor to hold)"),
    (("trainer.eval_only", "trainer.resume"), lambda eval_only, resume: not eval_only or bool(resume),
     "trainer.eval_only=true with trainer.resume=PATH/TO/checkpoint.pt"),
    (("model.mix_token", "data.multi_label"), lambda mix_token, multi_label: not (mix_token and multi_label),
     "model.mix_token=true with single-label data (token labelling's loss is a softmax over classes)"),
    (("data.val_split", "data.multi_label"), lambda val_split, multi_label: not (val_split and multi_label),
     "data.val_split with single-label data (the hold-out is class-balanced); for multi-label data split the CSV"),
    (("data.protocol", "data.val_split"), lambda protocol, val_split: protocol != "selection" or val_split > 0,
     "data.protocol=selection with data.val_split=N, the hold-out to select on (CIFAR: 5000)"),
    (("data.protocol", "data.val_split"), lambda protocol, val_split: protocol != "final" or val_split == 0,
     "data.protocol=final with data.val_split=0: the final run trains on every train image"),
    (("data.protocol", "trainer.attention_maps"), lambda protocol, maps: protocol != "final" or maps == 0,
     "data.protocol=final with trainer.attention_maps=0 (the maps come from the per-epoch evaluation, which the "
     "final run does not make on the test set)"),
    (("data.decode", "data.randaugment", "data.reprob", "data.color_jitter"),
     lambda decode, randaugment, reprob, jitter: decode != "gpu" or not (randaugment or reprob > 0 or jitter > 0),
     "data.decode=gpu without data.randaugment, data.reprob and data.color_jitter (they run on PIL images); "
     "or data.decode=auto"),
    (("trainer.amp", "trainer.device"), lambda amp, device: amp != "fp16" or device != "cpu",
     "trainer.amp=fp16 on CUDA only; on the CPU use trainer.amp=bf16"),
]


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is not allowed, the value and what is allowed."""
    values = OmegaConf.to_container(cfg, resolve=True)
    _check_paper(values)
    checks = _block_defaults_checks(cfg, values)  # first: a bad default shows under the key the recipe set
    checks += [(key, _lookup(values, key), rule) for key, rule in RULES.items()]
    model = values.get("model") or {}
    checks += _group_checks("model", model, MODEL_RULES)
    checks += _group_checks("model.backbone_options", model.get("backbone_options") or {}, MODEL_RULES)  # AG-CNN's
    specs = [("attention", values.get("attention") or {})]
    specs += [(f"attention_extra[{i}]", spec) for i, spec in enumerate(values.get("attention_extra") or [])]
    per_stage = {key: list_of(rule) for key, rule in ATTENTION_RULES.items()}  # by_stage: one value per stage
    for path, spec in specs:
        checks += _group_checks(path, spec, ATTENTION_RULES)
        checks += _group_checks(f"{path}.by_stage", spec.get("by_stage") if isinstance(spec, dict) else None,
                                per_stage)
    for key, value, rule in checks:
        if value is not _ABSENT and not rule.accepts(value):
            raise ConfigError(f"{key}={_show(value)} is not allowed: use {rule.allowed}")
    for keys, agree, allowed in JOINT_RULES:
        found = [_lookup(values, key) for key in keys]
        if _ABSENT not in found and not agree(*found):
            given = " ".join(f"{key}={_show(value)}" for key, value in zip(keys, found))
            raise ConfigError(f"{given} do not go together: use {allowed}")


_ABSENT = object()  # a key the config does not have (None is a value: null)


PAPER_METRICS = ("top1_err",)


def _check_paper(values: dict) -> None:
    """Refuse a recipe's ``paper`` block that the ablation table could not read: its key must be a config key
    and its values [config value, number] pairs."""
    paper = values.get("paper")
    if paper is None:
        return
    if not isinstance(paper, dict) or paper.get("metric") not in PAPER_METRICS:
        raise ConfigError(f"paper.metric={_show((paper or {}).get('metric') if isinstance(paper, dict) else paper)} "
                          f"is not allowed: use a paper block with metric one of {', '.join(PAPER_METRICS)}")
    if _lookup(values, str(paper.get("key"))) is _ABSENT:
        raise ConfigError(f"paper.key={_show(paper.get('key'))} is not allowed: use a key of this config, "
                          "e.g. attention.name or attention.reduction")
    pairs = paper.get("values")
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list) and len(p) == 2 and _number(p[1]) for p in pairs):
        raise ConfigError(f"paper.values={_show(pairs)} is not allowed: use a list of [config value, number] pairs")


def _block_defaults_checks(cfg: DictConfig, values: dict) -> list[tuple[str, Any, Rule]]:
    """The value checks of ``block_defaults``; raise ConfigError for a default the chosen block's
    config does not read (a misspelt key would otherwise change nothing, silently)."""
    defaults = values.get("block_defaults") or {}
    bad = [name for name, keys in defaults.items() if not isinstance(keys, dict)]
    if bad:
        raise ConfigError(f"block_defaults.{bad[0]}={_show(defaults[bad[0]])} is not allowed: use a mapping of "
                          f"that block's hyper-parameters, e.g. block_defaults.se={{reduction:24}}")
    name = (values.get("attention") or {}).get("name")
    if name in defaults and isinstance(cfg.get("attention"), DictConfig):
        unresolved = " ".join(str(v) for v in OmegaConf.to_container(cfg.attention, resolve=False).values())
        read = re.findall(rf"block_defaults\.{re.escape(name)}\.(\w+)", unresolved)
        for key, value in defaults[name].items():
            if key not in read:
                raise ConfigError(
                    f"block_defaults.{name}.{key}={_show(value)} is not allowed: attention={name} reads "
                    f"{', '.join(f'block_defaults.{name}.{k}' for k in read) or 'no block_defaults'} only; "
                    "correct the key, or set the block's value as attention.<key>=..."
                )
    return [(f"block_defaults.{name}.{key}", value, ATTENTION_RULES[key])
            for name, keys in defaults.items() for key, value in keys.items() if key in ATTENTION_RULES]


def _lookup(values: dict, dotted: str) -> Any:
    """The value at a dotted key, or _ABSENT."""
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _group_checks(path: str, group: Any, rules: dict[str, Rule]) -> list[tuple[str, Any, Rule]]:
    """The checks of one model config or attention spec: its keys that have a rule."""
    if not isinstance(group, dict):
        return []
    return [(f"{path}.{key}", value, rules[key]) for key, value in group.items() if key in rules]


def _show(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if isinstance(value, (ListConfig, list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, bool) or str(value) in ("True", "False"):
        return str(value).lower()
    return "null" if value is None else str(value)
