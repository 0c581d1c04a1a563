"""Checkpoints: atomic writes, weights-only loading, exact resume in one process, fine-tuning's start."""
import pickle

import pytest
import torch

import engine.run
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.resume import ResumeRefused
from engine.run import train
from tests.helpers import read_metrics, steps_per_epoch

# --- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3)}, "epoch": 4, "rng": {"python": (3, tuple(range(5)), None)}}
    save_checkpoint(state, tmp_path / "ck" / "last.pt")
    loaded = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 4
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"]  # no temp file left


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "epoch": 1}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'x.pt'} does not exist"):
        load_checkpoint(tmp_path / "x.pt")


def test_garbage_and_foreign_files_are_not_checkpoints(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a loadable attnlab checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no 'model' and 'epoch' entries"):
        load_checkpoint(tmp_path / "foreign.pt")


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Payload(), "epoch": 1}, f)
    torch.save({"model": Payload(), "epoch": 1}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("in_memory", ["true", "false"])  # the tensor-resident path and the PIL path
def test_resume_continues_at_the_right_epoch_and_matches_an_uninterrupted_run(quick_config, tmp_path, monkeypatch,
                                                                             in_memory):
    cfg = quick_config("trainer.epochs=3", f"data.in_memory={in_memory}")
    full = train(cfg, tmp_path / "full")

    real_epoch, calls = engine.run.train_one_epoch, []

    def crash_in_epoch_3(model, loader, state, *args, **kwargs):
        calls.append(state.step)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies after epoch 2's checkpoint
        return real_epoch(model, loader, state, *args, **kwargs)

    monkeypatch.setattr(engine.run, "train_one_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed")
    assert read_metrics(tmp_path / "resumed")["status"] == "failed"
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 2

    calls.clear()
    resumed = train(cfg, tmp_path / "resumed")  # same run dir: picks up its last.pt by itself
    assert calls == [2 * steps_per_epoch(cfg)]  # one epoch run, starting after epoch 2's steps
    assert resumed["epoch"] == 3 and resumed["train_loss"] == full["train_loss"]
    assert resumed["top1_err"] == full["top1_err"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_resume_from_a_checkpoint_on_the_epochs_last_step(quick_config, tmp_path, monkeypatch, in_memory):
    """A stop on the last step (a signal at the epoch-end sync point, or a kill during evaluation after a
    periodic checkpoint there) resumes into an epoch with no steps left, even when its last batch was partial."""
    cfg = quick_config("trainer.epochs=2", "data.max_train_samples=250", f"data.in_memory={in_memory}")
    steps = steps_per_epoch(cfg)
    assert cfg.data.max_train_samples % cfg.data.batch_size  # a partial last batch
    cfg.trainer.checkpoint_every_steps = steps  # a periodic checkpoint on the epoch's last step
    full = train(cfg, tmp_path / "full")
    real_evaluate = engine.run.evaluate

    def dies_in_the_first_evaluation(*args, **kwargs):
        monkeypatch.setattr(engine.run, "evaluate", real_evaluate)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.run, "evaluate", dies_in_the_first_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["partial"]["batches"] == steps
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["train_loss"] == full["train_loss"] and resumed["top1_err"] == full["top1_err"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_explicit_resume_path_and_eval_only(quick_config, tmp_path):
    train(quick_config("trainer.epochs=1", "sched=step"), tmp_path / "a")  # a step schedule may be extended
    best = tmp_path / "a" / "checkpoints" / "best.pt"
    trained = read_metrics(tmp_path / "a")
    result = train(quick_config("trainer.eval_only=true", f"trainer.resume={best}"), tmp_path / "eval")
    assert result["status"] == "completed" and result["top1_err"] == pytest.approx(trained["top1_err"])
    assert not (tmp_path / "eval" / "checkpoints").exists()
    more = train(quick_config("trainer.epochs=2", f"trainer.resume={best}", "sched=step"), tmp_path / "b")
    assert more["epoch"] == 2 and len(load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["history"]) == 2


def test_checkpoint_from_another_model_is_refused(quick_config, tmp_path):
    train(quick_config("trainer.epochs=1"), tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    with pytest.raises(ResumeRefused, match="model.name: resnet20 -> resnet32"):  # the config comparison first
        train(quick_config("trainer.epochs=2", "model=resnet32", f"trainer.resume={last}"), tmp_path / "b")
    with pytest.raises(CheckpointError, match="different model"):  # eval_only reads the weights alone
        train(quick_config("trainer.eval_only=true", "model=resnet32", f"trainer.resume={last}"), tmp_path / "c")


def test_fine_tuning_with_a_new_head_is_explicit(tmp_path):
    from engine.checkpoint import load_init_weights
    from models import build_model

    source = build_model({"name": "resnet20"}, {"name": "se"}, num_classes=10)
    save_checkpoint({"model": source.state_dict(), "epoch": 3}, tmp_path / "c10.pt")
    target = build_model({"name": "resnet20"}, {"name": "se"}, num_classes=2)
    fresh_head = target.fc.weight.clone()
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(10, 64\) vs model \(2, 64\).*trainer.new_head=true"):
        load_init_weights(target, tmp_path / "c10.pt", new_head=False)
    load_init_weights(target, tmp_path / "c10.pt", new_head=True)
    assert torch.equal(target.conv1.weight, source.conv1.weight)  # the backbone came over
    assert torch.equal(target.fc.weight, fresh_head)  # the classifier did not
    other = build_model({"name": "resnet20"}, {"name": "cbam"}, num_classes=2)
    with pytest.raises(CheckpointError, match="does not fit this model.*(missing|unexpected)"):
        load_init_weights(other, tmp_path / "c10.pt", new_head=True)  # another architecture: refused


@pytest.mark.parametrize("model_cfg", [{"name": "agcnn", "backbone": "resnet20", "stem": "cifar", "img_size": 32},
                                       {"name": "volo_d1", "stem": "cifar", "img_size": 32, "layers": [1, 1, 1, 1],
                                        "embed_dims": [32, 64, 64, 64], "num_heads": [2, 4, 4, 4]}],
                         ids=["agcnn", "volo"])
def test_a_new_head_leaves_every_classifier_the_model_declares_fresh(tmp_path, model_cfg):
    """AG-CNN's fusion layer and both branches' heads; VOLO's head and auxiliary token head."""
    from engine.checkpoint import load_init_weights
    from models import build_model

    source = build_model(model_cfg, {"name": "none"}, num_classes=10)
    save_checkpoint({"model": source.state_dict(), "epoch": 3}, tmp_path / "c10.pt")
    target = build_model(model_cfg, {"name": "none"}, num_classes=2)
    heads = tuple(f"{n}." for n in target.classifier_names)
    assert len(heads) > 1
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(heads)}
    load_init_weights(target, tmp_path / "c10.pt", new_head=True)
    after, before = target.state_dict(), source.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fresh.items())
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith(heads))
