"""The input paths: the per-sample randomness contract, the tensor-resident path against the PIL path,
and when ``data.in_memory=auto`` chooses which."""
import logging
import math
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, build_datasets, build_loaders, set_train_epoch
from data.in_memory import ResidentLoader
from data.randomness import crop_flip_params, library_rngs, resized_crop_boxes, sample_seed, uniforms
from errors import ConfigError
from tests.helpers import compose_config


def cifar_like_folder(root, sizes=((32, 32),), per_class: int = 6):
    """A 3-class ImageFolder of random images, JPEG in train/ and PNG in val/ as the shared CIFAR-10 copy;
    train/ cycles through ``sizes``, val/ has the first (the CIFAR recipe does not crop val images)."""
    generator = torch.Generator().manual_seed(0)
    for split, ext in (("train", "jpg"), ("val", "png")):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)] if split == "train" else sizes[0]
                pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.{ext}")
    return root


def cifar_config(root, *overrides: str):
    return compose_config("data=cifar10", f"data.root={root}", "data.num_classes=3", "data.num_workers=0",
                          "data.batch_size=5", *overrides).data


def first_batches(cfg, epoch: int = 2, skip: int = 0, world_size: int = 1, rank: int = 0):
    """Every train batch of ``epoch`` (from ``skip`` on) and every val batch, from the configured path."""
    train_set, val_set = build_datasets(cfg)
    train, val = build_loaders(cfg, train_set, val_set, rank=rank, world_size=world_size, seed=7)
    set_train_epoch(train, epoch, skip)
    return train, list(train), list(val)


def test_uniforms_are_a_function_of_seed_epoch_and_index_alone():
    batch = uniforms(3, 2, [5, 9, 1000], 4)
    assert batch.shape == (3, 4) and ((0 <= batch) & (batch < 1)).all()
    assert np.array_equal(batch[1], uniforms(3, 2, [9], 4)[0])  # the same in a batch or alone, in any order
    assert not np.array_equal(batch, uniforms(3, 3, [5, 9, 1000], 4))  # another epoch
    assert not np.array_equal(batch, uniforms(4, 2, [5, 9, 1000], 4))  # another seed
    many = uniforms(0, 1, np.arange(20_000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03
    assert sample_seed(0, 1, 5) == sample_seed(0, 1, 5) != sample_seed(0, 1, 6)


def test_crop_offsets_and_flips_cover_what_random_crop_and_flip_allow():
    tops, lefts, flips = crop_flip_params(0, 1, np.arange(9_000), 32, 32, size=32, padding=4, flip=True)
    assert set(tops) == set(lefts) == set(range(9))  # padded 40, crop 32: offsets 0..8, each ~1/9
    assert abs(np.bincount(tops).max() / 1000 - 1) < 0.15 and abs(flips.mean() - 0.5) < 0.03
    pairs = np.bincount(tops * 9 + lefts, minlength=81)  # rows and columns drawn apart: every shift, ~111 each
    assert pairs.min() > 60, pairs.reshape(9, 9)
    _, _, never = crop_flip_params(0, 1, np.arange(100), 32, 32, size=32, padding=2, flip=False)
    assert not never.any()


def test_resized_crop_boxes_follow_the_scale_and_ratio_or_fall_back_to_the_centre():
    heights, widths = np.full(2_000, 300), np.full(2_000, 400)
    top, left, h, w, flip = resized_crop_boxes(1, 1, np.arange(2_000), heights, widths)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
    fraction, aspect = h * w / (300 * 400), w / h
    assert fraction.min() >= 0.08 - 0.01 and fraction.max() <= 1.0 and fraction.min() < 0.1 < 0.9 < fraction.max()
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02 and abs(flip.mean() - 0.5) < 0.05
    # a 1000x10 strip fits no crop of aspect >= 3/4 once the area is large: those fall back to the centre,
    # the whole height and the widest allowed aspect ratio
    top, left, h, w, _ = resized_crop_boxes(1, 1, np.arange(200), np.full(200, 10), np.full(200, 1000),
                                            scale=(0.9, 1.0))
    assert (h == 10).all() and (w == round(10 * 4 / 3)).all() and (left == (1000 - w) // 2).all()


def test_library_augmentations_draw_from_the_sample_and_leave_the_global_rngs_alone():
    torch.manual_seed(1)
    random.seed(1)
    before = torch.get_rng_state(), random.getstate()
    with library_rngs(sample_seed(0, 1, 3)):
        first = torch.rand(3), random.random()
    with library_rngs(sample_seed(0, 1, 3)):
        again = torch.rand(3), random.random()
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


@pytest.mark.parametrize("extra", [(), ("data.randaugment=rand-m9-mstd0.5", "data.reprob=0.5")])
def test_the_pil_path_never_touches_the_global_rngs(tmp_path, extra):
    cfg = cifar_config(cifar_like_folder(tmp_path / "d"), "data.in_memory=false", *extra)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    _, batches, _ = first_batches(cfg)
    assert torch.equal(torch.get_rng_state(), before[0])  # dropout, DropPath and mixup keep their streams
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    assert batches[0][0].shape == (5, 3, 32, 32)


def test_tensor_path_gives_the_pil_paths_pixels_for_the_same_seed(tmp_path):
    root = cifar_like_folder(tmp_path / "d")
    loader, resident, resident_val = first_batches(cifar_config(root, "data.in_memory=true"), skip=1)
    _, pil, pil_val = first_batches(cifar_config(root, "data.in_memory=false"), skip=1)
    assert isinstance(loader, ResidentLoader) and len(resident) == len(pil) == 3  # 18 images, batch 5, one skipped
    assert len(resident_val) == len(pil_val) == 2  # batch 10
    for (x, y), (x_pil, y_pil) in zip(resident + resident_val, pil + pil_val):
        assert torch.equal(y, y_pil)
        torch.testing.assert_close(x, x_pil, rtol=0, atol=1e-6)  # the same crops, flips and normalisation


def test_tensor_path_on_the_shared_cifar10_matches_the_pil_path(cifar10_root):
    overrides = ("data.max_train_samples=64", "data.max_val_samples=20", "data.num_classes=10")
    _, resident, resident_val = first_batches(cifar_config(cifar10_root, *overrides, "data.in_memory=true"))
    _, pil, pil_val = first_batches(cifar_config(cifar10_root, *overrides, "data.in_memory=false"))
    assert (len(resident), len(resident_val)) == (len(pil), len(pil_val)) == (13, 2)  # batches of 5 and 10
    for (x, y), (x_pil, y_pil) in zip(resident + resident_val, pil + pil_val):
        assert torch.equal(y, y_pil)
        torch.testing.assert_close(x, x_pil, rtol=0, atol=1e-6)


def test_two_ranks_of_the_tensor_path_split_each_epoch_like_the_sampler(tmp_path):
    cfg = cifar_config(cifar_like_folder(tmp_path / "d"), "data.in_memory=true")
    _, whole, _ = first_batches(cfg)
    shards = [first_batches(cfg, world_size=2, rank=r)[1] for r in (0, 1)]

    def samples(batches) -> list[float]:
        """Each augmented image's pixel sum: the crop depends on the index alone, so it names the sample."""
        return sorted(torch.cat([x.sum((1, 2, 3)) for x, _ in batches]).tolist())

    assert [len(samples(s)) for s in shards] == [9, 9]  # 18 images, 9 a rank, none twice
    assert samples(shards[0] + shards[1]) == pytest.approx(samples(whole), abs=1e-3)


def test_digits_go_in_memory_by_default(caplog):
    cfg = compose_config("data.max_train_samples=64", "data.max_val_samples=32").data
    with caplog.at_level(logging.INFO, logger="attnlab"):
        loader, batches, _ = first_batches(cfg)
    assert isinstance(loader, ResidentLoader) and "data in memory" in caplog.text
    assert len(batches) == math.ceil(64 / cfg.batch_size)


@pytest.mark.parametrize("overrides,reason", [
    (("data.randaugment=rand-m9-mstd0.5",), "data.randaugment (timm's RandAugment) runs on PIL images"),
    (("data.reprob=0.25",), "data.reprob (timm's random erasing) runs per image"),
])
def test_auto_uses_the_pil_path_for_per_image_augmentation_and_says_why(tmp_path, caplog, overrides, reason):
    cfg = cifar_config(cifar_like_folder(tmp_path / "d"), *overrides)
    with caplog.at_level(logging.INFO, logger="attnlab"):
        loader, _, _ = first_batches(cfg)
    assert not isinstance(loader, ResidentLoader) and reason in caplog.text
    with pytest.raises(ConfigError, match=re.escape(f"data.in_memory=true but {reason}; set data.in_memory=auto")):
        first_batches(cifar_config(tmp_path / "d", *overrides, "data.in_memory=true"))


def test_images_of_several_sizes_or_over_the_budget_stay_on_the_pil_path(tmp_path, caplog, monkeypatch):
    mixed = cifar_config(cifar_like_folder(tmp_path / "mixed", sizes=((32, 32), (36, 40))))
    with caplog.at_level(logging.INFO, logger="attnlab"):
        loader, batches, _ = first_batches(mixed)
    assert not isinstance(loader, ResidentLoader) and "do not share one size" in caplog.text
    assert batches[0][0].shape == (5, 3, 32, 32)
    with pytest.raises(DataError, match="data.in_memory=true but .* do not share one size"):
        first_batches(cifar_config(tmp_path / "mixed", "data.in_memory=true"))

    monkeypatch.setattr("data.in_memory.memory_budget", lambda device=None: 1000)  # bytes: not even one 32x32 image set
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attnlab"):
        loader, _, _ = first_batches(cifar_config(cifar_like_folder(tmp_path / "even"), "data.num_workers=0"))
    assert not isinstance(loader, ResidentLoader) and "more than the in-memory budget" in caplog.text


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_a_crop_larger_than_the_padded_images_is_refused(tmp_path, in_memory):
    cfg = cifar_config(cifar_like_folder(tmp_path / "d"), "data.image_size=48", f"data.in_memory={in_memory}")
    with pytest.raises(DataError, match="data.image_size=48 is larger than the 32x32 images padded by 4; "
                                        "set data.image_size=32"):
        first_batches(cfg)


def test_an_epoch_resumed_after_its_last_step_has_no_batches_left(tmp_path):
    cfg = cifar_config(cifar_like_folder(tmp_path / "d"), "data.in_memory=true")
    for skip in (4, 5):  # 18 images in batches of 5: the 4th is partial, so 4 batches skip 20 > 18 samples
        loader, batches, _ = first_batches(cfg, skip=skip)
        assert len(loader) == 0 and batches == []


def test_an_unknown_in_memory_value_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="data.in_memory=sometimes is not valid; use one of auto, true, false"):
        first_batches(cifar_config(cifar_like_folder(tmp_path / "d"), "data.in_memory=sometimes"))
