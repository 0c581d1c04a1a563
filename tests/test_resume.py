"""Records that never lie: a finished run's command again changes nothing, and a resume trains on the config
its run started with (free keys logged, rounding-only keys flagged, a longer step schedule allowed, anything
else refused with the run directory left byte-for-byte)."""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import engine.run
from engine.checkpoint import load_checkpoint
from engine.metrics import mark_failed
from engine.resume import ResumeRefused, compare_configs
from engine.run import train
from tests.helpers import compose_config, make_image_folder, read_metrics, run_cli


def tree_digest(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir`` and a hash of its bytes (Hydra's own ``.hydra/`` and log aside, and the
    run lock's holder line, which names the last process that owned the directory)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
            and p.name != ".run.lock"}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold equal model weights."""
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


QUICK_CLI = ("data=digits", "model=resnet20", "data.max_train_samples=128", "data.max_val_samples=60",
             "trainer.progress=false", "trainer.device=cpu")


def test_a_finished_runs_command_again_prints_its_result_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    args = (*QUICK_CLI, "trainer.epochs=1", "data.val_split=40", f"hydra.run.dir={run_dir}")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    before = tree_digest(run_dir)
    assert "test_top1_err" in read_metrics(run_dir) and "history" in read_metrics(run_dir)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    assert "already complete: top-1 error" in out and "test top-1 error" in out
    assert tree_digest(run_dir) == before


def test_a_resume_that_changes_what_training_computes_is_refused_and_leaves_the_run_as_it_was(quick_config,
                                                                                            tmp_path):
    run_dir = tmp_path / "run"
    train(quick_config("trainer.epochs=1"), run_dir)
    before = tree_digest(run_dir)
    with pytest.raises(ResumeRefused) as refused:
        train(quick_config("trainer.epochs=1", "optim.lr=1e6", "data.batch_size=32"), run_dir)
    message = str(refused.value)
    assert "\n" not in message and str(run_dir / "checkpoints" / "last.pt") in message
    assert "optim.lr: 0.1 -> 1000000.0" in message and "data.batch_size: 64 -> 32" in message
    assert "trainer.init_from=" in message
    assert tree_digest(run_dir) == before
    assert read_metrics(run_dir)["status"] == "completed"


@pytest.mark.parametrize("schedule, allowed", [("cosine", False), ("step", True)])
def test_more_epochs_only_where_the_schedule_does_not_follow_the_length(quick_config, tmp_path, schedule, allowed):
    """A step schedule extended after its first epoch trains exactly as the longer run from the start; a cosine
    one is refused (timm restores its old length, the extra epochs would run at min_lr)."""
    run_dir = tmp_path / "run"
    train(quick_config(f"sched={schedule}", "trainer.epochs=1"), run_dir)
    longer = quick_config(f"sched={schedule}", "trainer.epochs=2")
    if not allowed:
        with pytest.raises(ResumeRefused, match="trainer.epochs: 1 -> 2 .*cosine schedule"):
            train(longer, run_dir)
        return
    extended = train(longer, run_dir)
    full = train(longer, tmp_path / "full")
    assert extended["epoch"] == 2 and extended["train_loss"] == full["train_loss"]
    assert same_weights(run_dir / "checkpoints" / "last.pt", tmp_path / "full" / "checkpoints" / "last.pt")
    change = {"epoch": 1, "key": "trainer.epochs", "old": 1, "new": 2}
    assert change in read_metrics(run_dir)["config_changes"]
    assert change in json.loads((run_dir / "config_changes.json").read_text())["changes"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["epochs"] == 1  # what it started with


def test_a_resume_changing_only_free_keys_continues_bit_exactly(quick_config, tmp_path, monkeypatch, caplog):
    cfg = quick_config("trainer.epochs=2")
    full = train(cfg, tmp_path / "full")
    real_epoch = engine.run.train_one_epoch

    def dies_in_epoch_2(model, loader, state, *args, **kwargs):
        if state.step:
            raise KeyboardInterrupt
        return real_epoch(model, loader, state, *args, **kwargs)

    monkeypatch.setattr(engine.run, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    monkeypatch.setattr(engine.run, "train_one_epoch", real_epoch)
    with caplog.at_level(logging.INFO, logger="attnlab"):
        resumed = train(quick_config("trainer.epochs=2", "trainer.log_interval=1", "data.num_workers=1"),
                        tmp_path / "run")
    assert resumed["train_loss"] == full["train_loss"] and resumed["top1_err"] == full["top1_err"]
    assert same_weights(tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "full" / "checkpoints" / "last.pt")
    assert "trainer.log_interval changed from 20 to 1" in caplog.text
    assert {c["key"] for c in resumed["config_changes"]} == {"trainer.log_interval", "data.num_workers"}


def test_stop_after_epochs_stops_resumably(quick_config, tmp_path):
    """trainer.stop_after_epochs=1 of a 2-epoch cosine run stops with its checkpoint; the same command
    without it finishes as the uninterrupted run (the schedule kept its length)."""
    full = train(quick_config("trainer.epochs=2"), tmp_path / "full")
    stopped = train(quick_config("trainer.epochs=2", "trainer.stop_after_epochs=1"), tmp_path / "run")
    assert stopped["status"] == "stopped" and stopped["epoch"] == 1
    assert stopped["lr"] == full["history"][0]["lr"]
    finished = train(quick_config("trainer.epochs=2"), tmp_path / "run")
    assert finished["status"] == "completed" and finished["train_loss"] == full["train_loss"]


def test_a_key_that_changes_only_rounding_is_allowed_and_said_to_break_bit_exactness(quick_config, tmp_path,
                                                                                      caplog):
    train(quick_config("trainer.epochs=2", "trainer.stop_after_epochs=1"), tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="attnlab"):
        resumed = train(quick_config("trainer.epochs=2", "trainer.channels_last=true"), tmp_path / "run")
    assert resumed["status"] == "completed"
    assert "trainer.channels_last changed from False to True: this resume is no longer bit-exact" in caplog.text


def test_keys_an_older_checkpoint_lacks_count_as_unchanged_at_their_defaults():
    new = {"trainer": {"epochs": 3, "stop_after_epochs": None, "log_interval": 20}, "data": {"val_split": 0}}
    old = {"trainer": {"epochs": 3, "log_interval": 20}, "data": {}}
    assert compare_configs(old, new, epochs_done=1, trained_in_phases=False) == []
    with pytest.raises(ResumeRefused, match=r"data.val_split: <absent> -> 5000"):
        compare_configs(old, {**new, "data": {"val_split": 5000}}, epochs_done=1, trained_in_phases=False)


def test_a_run_trained_in_phases_cannot_be_extended():
    cfg = {"trainer": {"epochs": 3}, "sched": {"name": "step"}}
    with pytest.raises(ResumeRefused, match="phases"):
        compare_configs(cfg, {**cfg, "trainer": {"epochs": 4}}, epochs_done=3, trained_in_phases=True)
    with pytest.raises(ResumeRefused, match="only be extended"):
        compare_configs(cfg, {**cfg, "trainer": {"epochs": 2}}, epochs_done=3, trained_in_phases=False)


def test_a_finished_runs_record_is_never_marked_failed(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "top1_err": 5.0}))
    before = (tmp_path / "metrics.json").read_bytes()
    mark_failed(tmp_path, ValueError("a later command's bad value"))
    assert (tmp_path / "metrics.json").read_bytes() == before


def test_a_resume_on_other_files_is_refused_and_a_moved_copy_is_not(tmp_path):
    """data.root is free to change (a copy moved), but not the files it holds: the checkpoint's fingerprint
    of each split (count, classes, a hash of the file list) must match."""
    root = make_image_folder(tmp_path / "pets", per_class=4)
    data = ("data=imagefolder", "data.num_classes=2", "data.image_size=32", "data.num_workers=0", "trainer.epochs=2",
            "data.batch_size=4", "trainer.progress=false", "model=resnet20", "data.stem=cifar")
    run_dir = tmp_path / "run"
    train(compose_config(*data, f"data.root={root}", "trainer.stop_after_epochs=1"), run_dir)
    moved = Path(shutil.copytree(root, tmp_path / "moved"))
    (moved / "train" / "cat" / "0.png").rename(moved / "train" / "cat" / "renamed.png")
    before = tree_digest(run_dir)
    with pytest.raises(ResumeRefused, match=r"the train split holds other images \(8 then, 8 now; file list hash"):
        train(compose_config(*data, f"data.root={moved}"), run_dir)
    assert tree_digest(run_dir) == before
    (moved / "train" / "cat" / "renamed.png").rename(moved / "train" / "cat" / "0.png")
    assert train(compose_config(*data, f"data.root={moved}"), run_dir)["status"] == "completed"
