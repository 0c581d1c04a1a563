"""data.protocol: a selection run never opens the test split; a final run trains on every train image and
sees the test set once, at the end, with its final weights."""
import pytest
import torch

import data
import engine.run
from engine.config import check_config
from engine.run import train
from errors import ConfigError
from tests.helpers import read_metrics


def test_a_selection_run_never_opens_the_test_split(quick_config, tmp_path, monkeypatch):
    opened, real = [], data.build_dataset

    def recording(cfg, train, *args, **kwargs):
        opened.append(train)
        return real(cfg, train, *args, **kwargs)

    monkeypatch.setattr(data, "build_dataset", recording)
    result = train(quick_config("data.val_split=50", "data.protocol=selection", "trainer.epochs=1"), tmp_path)
    assert False not in opened  # only the train split was read (the hold-out included)
    assert not any(k.startswith("test_") for k in result) and "test_top1_err" not in read_metrics(tmp_path)
    assert result["val_images"] == 50 and result["best_top1_err"] == result["top1_err"]


def test_a_final_run_evaluates_once_at_the_end_with_its_final_weights(quick_config, tmp_path, monkeypatch):
    """The same training as a standard run (equal losses), no per-epoch evaluation or best.pt, and its test
    error is the standard run's last evaluation of the same split."""
    standard = train(quick_config("trainer.epochs=2"), tmp_path / "standard")
    evaluations, real = [], engine.run.evaluate

    def counting(*args, **kwargs):
        evaluations.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.run, "evaluate", counting)
    final = train(quick_config("trainer.epochs=2", "data.protocol=final"), tmp_path / "final")
    assert len(evaluations) == 1
    assert not (tmp_path / "final" / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "final" / "checkpoints" / "last.pt").exists()
    history = read_metrics(tmp_path / "final")["history"]
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in standard["history"]]
    assert all("top1_err" not in h and "val_loss" not in h for h in history)
    assert "best_top1_err" not in final and "top1_err" not in final
    assert final["test_top1_err"] == standard["top1_err"] and final["test_images"] == standard["val_images"]
    assert final["torch_threads"] == torch.get_num_threads()  # records say how many threads rounded the sums


@pytest.mark.parametrize("overrides, named", [
    (("data.protocol=selection",), "data.protocol=selection with data.val_split=N"),
    (("data.protocol=final", "data.val_split=100"), "data.protocol=final with data.val_split=0"),
    (("data.protocol=final", "trainer.attention_maps=2"), "data.protocol=final with trainer.attention_maps=0"),
])
def test_a_protocol_that_would_select_on_the_test_set_is_refused(quick_config, overrides, named):
    with pytest.raises(ConfigError, match=named):
        check_config(quick_config(*overrides))
