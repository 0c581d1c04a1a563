"""The training loop's parts: optimizer and schedule, one epoch, evaluation, non-finite losses, stop signals."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine.build
import engine.run
from engine.checkpoint import TrainState, load_checkpoint
from engine.optim import build_optimizer, build_scheduler
from engine.run import train
from engine.trainer import NonFiniteLossError, StepOptions, build_precision, evaluate, train_one_epoch
from models import ConfigError
from tests.helpers import compose_config, read_metrics, steps_per_epoch

# --- optimizer and schedule ----------------------------------------------------------------------

def test_sgd_nesterov_flag_and_no_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    cfg = compose_config("optim=sgd", "optim.nesterov=false").optim
    opt = build_optimizer(model, cfg)
    assert opt.param_groups[0]["nesterov"] is False and len(opt.param_groups) == 1
    cfg = compose_config("optim=sgd", "optim.nesterov=true", "optim.no_decay_norm_bias=true").optim
    groups = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in build_optimizer(model, cfg).param_groups}
    assert groups == {0.0: 4 + 4 + 4 + 2, cfg.weight_decay: 4 * 3 * 3 * 3 + 4 * 2}
    adamw = build_optimizer(model, compose_config("optim=adamw").optim)
    assert isinstance(adamw, torch.optim.AdamW)


def test_cosine_schedule_with_warmup_per_step():
    model = nn.Linear(2, 2)
    cfg = compose_config("optim.lr=0.1", "sched=cosine", "sched.warmup_epochs=1", "sched.warmup_lr=0.001").sched
    opt = build_optimizer(model, compose_config("optim.lr=0.1").optim)
    sched = build_scheduler(opt, cfg, epochs=4, steps_per_epoch=10)
    lrs = []
    for step in range(40):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    # timm fits the warmup inside the schedule: after it the lr is back on the cosine over all 40 steps
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.001 + 9 * (0.1 - 0.001) / 10)
    assert lrs[10] == pytest.approx(0.05 * (1 + math.cos(math.pi * 10 / 40)))
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_linear_schedule_decays_in_a_straight_line_to_min_lr_after_its_warm_up():
    """timm's poly at power 1 whatever sched.decay_rate holds (timm reads the power from it): after the warm-up
    the lr lies on the line from optim.lr at step 0 to min_lr at the last step, as timm fits it."""
    opt = build_optimizer(nn.Linear(2, 2), compose_config("optim.lr=0.1").optim)
    cfg = compose_config("sched=linear", "sched.warmup_epochs=1", "sched.warmup_lr=0.001", "sched.min_lr=0.0",
                         "sched.decay_rate=0.5").sched
    sched = build_scheduler(opt, cfg, epochs=4, steps_per_epoch=10)
    lrs = []
    for step in range(40):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[10:] == pytest.approx([0.1 * (1 - step / 40) for step in range(10, 40)])


def test_step_schedule_decays_at_the_milestones():
    opt = build_optimizer(nn.Linear(2, 2), compose_config("optim.lr=0.1").optim)
    cfg = compose_config("sched=step", "sched.decay_epochs=[2,3]").sched
    sched = build_scheduler(opt, cfg, epochs=4, steps_per_epoch=5)
    lr_at = {}
    for epoch in range(4):
        sched.step_update(epoch * 5)
        lr_at[epoch] = opt.param_groups[0]["lr"]
    assert lr_at == pytest.approx({0: 0.1, 1: 0.1, 2: 0.01, 3: 0.001})


def test_exponential_schedule_multiplies_the_lr_after_every_epoch():
    opt = build_optimizer(nn.Linear(2, 2), compose_config("optim.lr=0.045").optim)
    cfg = compose_config("sched=exponential").sched  # the MobileNet recipes' 0.98
    sched = build_scheduler(opt, cfg, epochs=4, steps_per_epoch=5)
    lrs = []
    for step in range(20):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.045 * cfg.decay_rate ** (step // 5) for step in range(20)])
    assert cfg.decay_rate == 0.98


def test_cosine_cooldown_holds_min_lr_for_its_last_epochs():
    """timm's cool-down (VOLO's 10 of 310 epochs): the cosine runs over the others, then min_lr."""
    opt = build_optimizer(nn.Linear(2, 2), compose_config("optim.lr=0.1").optim)
    cfg = compose_config("sched=cosine", "sched.cooldown_epochs=2", "sched.min_lr=0.001").sched
    sched = build_scheduler(opt, cfg, epochs=6, steps_per_epoch=5)
    lrs = []
    for step in range(30):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[19] > 0.001
    assert lrs[20:] == pytest.approx([0.001] * 10)  # epochs 5 and 6: the cool-down


def test_warm_up_and_cool_down_must_leave_epochs_for_the_schedule():
    from engine.config import check_config

    with pytest.raises(ConfigError, match="sched.warmup_epochs=5 sched.cooldown_epochs=5 trainer.epochs=10 do not go "
                                          "together: use fewer warm-up plus cool-down epochs than trainer.epochs"):
        check_config(compose_config("sched.warmup_epochs=5", "sched.cooldown_epochs=5", "trainer.epochs=10"))
    check_config(compose_config("sched.warmup_epochs=4", "sched.cooldown_epochs=5", "trainer.epochs=10"))


def test_unknown_optimizer_schedule_and_amp_list_valid_names():
    with pytest.raises(ConfigError, match="valid names: sgd, adamw"):
        build_optimizer(nn.Linear(1, 1), compose_config("optim.name=lamb").optim)
    with pytest.raises(ConfigError, match="use trainer.amp=bf16 on the CPU"):
        build_precision("fp16", torch.device("cpu"))


# --- the loop -----------------------------------------------------------------------------------

def test_evaluate_counts_top1_and_top5_errors_exactly():
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 0],   # label 0: top-1 hit
        [0.0, 9, 1, 2, 3, 4, 5],   # label 3: top-5 hit only
        [6.0, 5, 4, 3, 2, 1, 0],   # label 6: miss
        [1.0, 2, 3, 4, 5, 6, 7],   # label 6: top-1 hit
        [1.0, 2, 3, 4, 5, 6, 7],   # label 0: miss
    ])
    labels = torch.tensor([0, 3, 6, 6, 0])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)
    result = evaluate(nn.Identity(), loader, build_precision("none", torch.device("cpu")))
    assert result["count"] == 5
    assert result["top1_err"] == pytest.approx(100 * 3 / 5) and result["top5_err"] == pytest.approx(100 * 2 / 5)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())


class NaNAfter(nn.Module):
    """Wraps a model; its training forward returns NaN from call ``after + 1`` on."""

    def __init__(self, inner: nn.Module, after: int):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def poison_after(model: nn.Module, after: int) -> nn.Module:
    """``model`` itself (the engine asks its interface), its training forward returning NaN from call ``after + 1`` on."""
    forward, calls = model.forward, [0]

    def poisoned(x):
        out = forward(x)
        if model.training:
            calls[0] += 1
            if calls[0] > after:
                out = out * float("nan")
        return out

    model.forward = poisoned
    return model


def test_non_finite_loss_is_reported_with_its_step():
    model = NaNAfter(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), after=6)
    loader = DataLoader(TensorDataset(torch.randn(40, 3, 2, 2), torch.randint(0, 3, (40,))), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = build_precision("none", torch.device("cpu"))
    state = TrainState(model, opt, None, precision.scaler, epoch=1, step=10)
    with pytest.raises(NonFiniteLossError, match="at step 17 \\(epoch 2\\)"):
        train_one_epoch(model, loader, state, StepOptions(nn.CrossEntropyLoss(), precision, log_interval=4,
                                                          progress_bar=False))


def test_skip_mode_drops_exactly_the_non_finite_update(monkeypatch):
    """A NaN at step 3 with on_nonfinite=skip: the weights are those of training without that batch."""
    data = TensorDataset(torch.randn(24, 3, 2, 2), torch.randint(0, 3, (24,)))
    precision = build_precision("none", torch.device("cpu"))

    def trained(loader, poison: str | None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if poison:
            monkeypatch.setenv("ATTNLAB_TEST_NONFINITE_LOSS", poison)
        else:
            monkeypatch.delenv("ATTNLAB_TEST_NONFINITE_LOSS", raising=False)
        options = StepOptions(nn.CrossEntropyLoss(), precision, log_interval=2, on_nonfinite="skip",
                              progress_bar=False)
        stats = train_one_epoch(model, loader, TrainState(model, opt, None, precision.scaler), options)
        return model[1].weight.detach(), stats

    weights, stats = trained(DataLoader(data, batch_size=4), poison="0:3")
    without_batch_3 = torch.utils.data.Subset(data, [*range(8), *range(12, 24)])
    expected, clean = trained(DataLoader(without_batch_3, batch_size=4), poison=None)
    assert stats["skipped_steps"] == 1 and stats["steps"] == 6 and stats["loss_steps"] == 5
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="trainer.on_nonfinite='ignore' is not valid; use one of stop, skip"):
        StepOptions(nn.CrossEntropyLoss(), precision, on_nonfinite="ignore")


def test_bf16_autocast_and_channels_last_train_on_the_cpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).to(memory_format=torch.channels_last)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))), batch_size=8)
    before = model[0].weight.detach().clone()
    precision = build_precision("bf16", torch.device("cpu"))
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), None, precision.scaler)
    options = StepOptions(nn.CrossEntropyLoss(), precision, channels_last=True, clip_grad=1.0, progress_bar=False)
    stats = train_one_epoch(model, loader, state, options)
    assert stats["loss_steps"] == 2 and math.isfinite(stats["loss_sum"]) and state.step == 2
    assert not torch.equal(before, model[0].weight)


def test_ema_follows_the_trained_module_through_a_wrapper():
    """With decay 0 the EMA copy equals the weights after every update, also when the steps run through a
    wrapper (DDP, torch.compile) while the EMA reads ``state.model``."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    wrapper = nn.Sequential(model)  # what the steps run: another module holding the same parameters
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 4, 4), torch.randint(0, 3, (12,))), batch_size=4)
    precision = build_precision("none", torch.device("cpu"))
    ema = ModelEmaV3(model, decay=0.0)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.5), None, precision.scaler, ema)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    train_one_epoch(wrapper, loader, state, StepOptions(nn.CrossEntropyLoss(), precision, progress_bar=False))
    after, trained = ema.module.state_dict(), model.state_dict()
    assert not torch.equal(after["3.weight"], before["3.weight"])
    assert all(torch.equal(after[k], trained[k]) for k in trained)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(quick_config, tmp_path, monkeypatch):
    cfg = quick_config("trainer.epochs=3", "trainer.log_interval=3")
    bad_step = steps_per_epoch(cfg) + 2  # epoch 2's second step, between two sync points
    real_build = engine.build.build_model
    monkeypatch.setattr(engine.build, "build_model", lambda *a, **k: poison_after(real_build(*a, **k), bad_step - 1))
    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step} \\(epoch 2\\)"):
        train(cfg, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "failed" and "NonFiniteLossError" in metrics["error"]


def test_skip_mode_finishes_the_run_and_counts_the_skipped_steps(quick_config, tmp_path, monkeypatch):
    cfg = quick_config("trainer.epochs=2", "trainer.on_nonfinite=skip")
    monkeypatch.setenv("ATTNLAB_TEST_NONFINITE_LOSS", f"0:2,{steps_per_epoch(cfg) + 2}")  # one in each epoch
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and math.isfinite(metrics["train_loss"])
    history = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["history"]
    assert [h["skipped_steps"] for h in history] == [1, 1]
    weights = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_linear_scaling_rule_scales_lr_by_the_global_batch():
    from engine.optim import scaled_lr

    cfg = compose_config("optim.lr=0.1", "optim.lr_reference_batch=256").optim
    assert scaled_lr(cfg, 8 * 128) == pytest.approx(0.4)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg, global_batch=512)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert build_optimizer(nn.Linear(2, 2), compose_config().optim, global_batch=512).param_groups[0]["lr"] == 0.1


def test_a_stop_signal_is_handed_on_to_the_handler_it_displaced():
    """Under SLURM, submitit's SIGUSR1 handler requeues the job: it must still run once the run stopped."""
    import os
    import signal

    from engine.interrupt import StopSignals

    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [] and signals.received == "SIGUSR1"  # recorded, not acted on, during the run
        handler, signum = signals.handoff()
        handler(signum, None)
        assert calls == [signal.SIGUSR1]
        with StopSignals() as signals:  # Ctrl-C's default handler is not handed anything
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT" and signals.handoff() is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_agcnn_restarts_the_lr_schedule_in_each_of_its_stages():
    """The AG-CNN paper trains its branches in turn: each stage runs the whole cosine from the peak lr."""
    from models import build_model

    model = build_model({"name": "agcnn", "backbone": "resnet20", "stem": "cifar", "img_size": 32}, {"name": "none"},
                        num_classes=3)
    phases = model.phase_epochs(8)
    assert phases == [4, 2, 2]  # model.stage_fractions 0.5, 0.25, 0.25
    assert [model.set_epoch(e, 8) for e in range(1, 9)] == ["global"] * 4 + ["local"] * 2 + ["fusion"] * 2
    opt = build_optimizer(model, compose_config("optim.lr=0.1").optim)
    sched = build_scheduler(opt, compose_config("sched=cosine").sched, 8, steps_per_epoch=1, phase_epochs=phases)
    lrs = []
    for step in range(8):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    starts = [0, 4, 6]
    assert [lrs[s] for s in starts] == pytest.approx([0.1] * 3)  # each stage starts at the peak
    assert lrs[5] == pytest.approx(0.05 * (1 + math.cos(math.pi * 1 / 2)))  # halfway through the local stage
    restored = build_scheduler(opt, compose_config("sched=cosine").sched, 8, 1, phases)
    restored.load_state_dict(sched.state_dict())
    restored.step_update(7)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[7])
