"""data.val_split: a class-balanced hold-out of the train split selects, the data set's own val split is the
test set, evaluated once with the final weights on the same input path."""
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from data import DataError, build_datasets, build_test_set, eval_transform, targets_of
from data.digits import DigitsDataset
from engine.checkpoint import load_checkpoint
from engine.config import check_config
from engine.run import train
from errors import ConfigError
from models import build_model
from tests.helpers import compose_config, make_image_folder


def test_hold_out_is_class_balanced_disjoint_and_takes_the_eval_transform():
    cfg = compose_config("data.val_split=100").data
    train_set, val_set = build_datasets(cfg, seed=3)
    full = DigitsDataset(True)
    assert len(train_set) + len(val_set) == len(full) and len(val_set) == 100
    assert not set(train_set.indices) & set(val_set.indices)
    assert Counter(targets_of(val_set)) == Counter({c: 10 for c in range(10)})
    # the same images whatever the run's seed: every run of a sweep validates on one hold-out
    assert val_set.indices == build_datasets(cfg, seed=4)[1].indices
    # held-out images come as the val split's do (eval transform), train images untransformed for the recipe
    transformed = DigitsDataset(True, cfg.image_size, eval_transform(cfg))
    index = val_set.indices[0]
    assert torch.equal(val_set[0][0], transformed[index][0])
    assert train_set.dataset.transform is None
    test_set = build_test_set(cfg)
    official = DigitsDataset(False, cfg.image_size, eval_transform(cfg))
    assert len(test_set) == len(official) and torch.equal(test_set[5][0], official[5][0])


def test_without_val_split_there_is_no_test_set():
    assert build_test_set(compose_config().data) is None


def test_hold_out_of_an_image_folder_is_cut_before_max_train_samples(tmp_path):
    root = make_image_folder(tmp_path / "pets")  # 6 train images, 3 a class
    cfg = compose_config("data=imagefolder", f"data.root={root}", "data.num_classes=2", "data.image_size=32",
                         "data.num_workers=0", "data.val_split=2", "data.max_train_samples=2").data
    train_set, val_set = build_datasets(cfg)
    held = {val_set.dataset.samples[i][0] for i in val_set.indices}
    trained = {train_set.dataset.dataset.samples[i][0] for i in
               (train_set.dataset.indices[j] for j in train_set.indices)}
    assert len(held) == len(trained) == 2 and not held & trained
    assert sorted(targets_of(val_set)) == sorted(targets_of(train_set)) == [0, 1]
    assert val_set[0][0].shape == (3, 32, 32)  # the eval transform's tensor
    assert len(build_test_set(cfg)) == 6  # val/, whole


def test_a_hold_out_of_the_whole_train_split_is_one_line():
    cfg = compose_config("data.val_split=100000").data
    with pytest.raises(DataError, match=r"data.val_split=100000 holds out the whole digits train split \(\d+ images\)"):
        build_datasets(cfg)


def test_val_split_with_multi_label_data_is_refused():
    cfg = compose_config("data.val_split=10", "data.multi_label=true")
    with pytest.raises(ConfigError, match="data.val_split=10 data.multi_label=true do not go together: use data.val_split with single-label"):
        check_config(cfg)


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_test_error_is_the_final_weights_on_the_official_split(quick_config, tmp_path, in_memory):
    """metrics.json's test_* are last.pt's weights on the digits val split, recomputed here by a plain loop;
    the val metrics are the hold-out's."""
    cfg = quick_config("data.val_split=60", "trainer.epochs=2", f"data.in_memory={in_memory}",
                       "data.num_workers=0")
    metrics = train(cfg, tmp_path)
    assert metrics["val_images"] == 60 and all(r["val_images"] == 60 for r in metrics["history"])
    assert all(r["epoch_s"] > 0 for r in metrics["history"])
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)
    model.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"])
    model.eval()
    wrong = total = 0
    with torch.no_grad():
        for x, y in DataLoader(DigitsDataset(False, cfg.data.image_size, eval_transform(cfg.data)), batch_size=97):
            wrong += (model(x).argmax(1) != y).sum().item()
            total += len(y)
    assert metrics["test_images"] == total == len(DigitsDataset(False))
    assert metrics["test_top1_err"] == pytest.approx(100 * wrong / total, abs=1e-6)


def test_a_test_set_over_the_memory_budget_is_read_per_image_with_the_same_batches(monkeypatch):
    """The train and val splits in memory, the test set not (its budget is spent): the PIL loader gives the
    same normalised images and targets as the resident one."""
    import data

    cfg = compose_config("data.val_split=60", "data.num_workers=0").data
    train_set, val_set = build_datasets(cfg)
    _, val_loader = data.build_loaders(cfg, train_set, val_set)
    assert isinstance(val_loader, data.ResidentLoader)
    test_set = build_test_set(cfg)
    resident = data.build_eval_loader(cfg, test_set, val_loader)
    monkeypatch.setattr(data, "memory_budget", lambda device: 0)
    per_image = data.build_eval_loader(cfg, test_set, val_loader)
    assert isinstance(resident, data.ResidentLoader) and isinstance(per_image, DataLoader)
    for (x, y), (x2, y2) in zip(resident, per_image, strict=True):
        assert torch.equal(y, y2) and torch.allclose(x, x2, atol=1e-6)
