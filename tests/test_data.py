"""Data: the digits default, class-balanced subsets, folder and torchvision layouts, bad input."""
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from data import DataError, build_datasets, train_transform
from data.digits import DigitsDataset
from data.samplers import ShardSampler, balanced_indices
from tests.helpers import compose_config, make_image_folder


def folder_config(root: Path, *overrides: str):
    return compose_config("data=imagefolder", f"data.root={root}", "data.num_classes=2",
                          "data.image_size=32", "data.num_workers=0", *overrides).data


def test_digits_is_the_whole_bundled_set_split_80_20_stratified():
    n = len(load_digits().target)
    train, val = DigitsDataset(True), DigitsDataset(False)
    assert len(train) + len(val) == n and len(val) == math.ceil(0.2 * n)  # sklearn rounds the test share up
    assert set(Counter(val.targets)) == set(range(10)) and max(Counter(val.targets).values()) <= 37
    x, y = train[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and isinstance(y, int)


def test_digits_split_does_not_depend_on_the_global_random_state():
    """The split is fixed (scikit-learn's ``random_state``): two builds under other global seeds agree."""
    import random

    import numpy as np

    def built_after(seed: int) -> torch.Tensor:
        random.seed(seed)
        np.random.seed(seed)  # what scikit-learn would draw from without a random_state
        torch.manual_seed(seed)
        return DigitsDataset(False).images

    assert torch.equal(built_after(123), built_after(7))


def test_balanced_subset_spreads_samples_over_classes():
    targets = [i % 10 for i in range(1000)]
    chosen = balanced_indices(targets, 25, seed=0)
    counts = Counter(targets[i] for i in chosen)
    assert len(chosen) == len(set(chosen)) == 25
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    assert chosen == balanced_indices(targets, 25, seed=0) != balanced_indices(targets, 25, seed=1)


def test_max_samples_options_cut_both_splits():
    cfg = compose_config("data.max_train_samples=50", "data.max_val_samples=20").data
    train, val = build_datasets(cfg)
    assert len(train) == 50 and len(val) == 20
    assert Counter(train.dataset.targets[i] for i in train.indices) == Counter({c: 5 for c in range(10)})


@pytest.mark.parametrize("size,world", [(10, 3), (7, 2), (5, 8), (100, 4)])
def test_shard_sampler_counts_every_sample_exactly_once(size, world):
    seen = [i for rank in range(world) for i in ShardSampler(size, rank, world)]
    assert sorted(seen) == list(range(size))


def test_image_folder_layout_loads_with_the_imagenet_recipe(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    train, val = build_datasets(folder_config(root))
    assert train.classes == ["cat", "dog"] and len(train) == len(val) == 6
    assert train_transform(folder_config(root))(train[0][0], 0, 1, 0).shape == (3, 32, 32)
    assert val[0][0].shape == (3, 32, 32)


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"data.root={tmp_path / 'nowhere'} does not exist"):
        build_datasets(folder_config(tmp_path / "nowhere"))


def test_root_without_images_is_an_error(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_datasets(folder_config(tmp_path))


def test_num_classes_must_match_the_data(tmp_path):
    root = make_image_folder(tmp_path / "pets", classes=("a", "b", "c"))
    with pytest.raises(DataError, match="data.num_classes=2 but the imagefolder data has 3 classes; set data.num_classes=3"):
        build_datasets(folder_config(root))


def test_corrupt_image_is_named(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    train, _ = build_datasets(folder_config(root))
    index = train.samples.index((str(bad), 0))
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        train[index]


def test_cifar_absent_offline_names_the_path_and_the_alternatives(tmp_path):
    cfg = compose_config("data=cifar10", f"data.root={tmp_path / 'c10'}").data
    with pytest.raises(DataError) as info:
        build_datasets(cfg)
    message = str(info.value)
    assert str(tmp_path / "c10") in message and "data.root=../shared/data/cifar10" in message
    assert "data.download=true" in message


def test_shared_cifar10_folder_layout(cifar10_root):
    cfg = compose_config("data=cifar10", f"data.root={cifar10_root}", "data.max_val_samples=100").data
    train, val = build_datasets(cfg)
    assert len(train) == 50_000 and len(val) == 100
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    image, y = train[0]
    assert train_transform(cfg)(image, 0, 1, 0).shape == (3, 32, 32) and y == 0


def test_cifar_recipe_with_timm_randaugment_and_random_erasing():
    from data.transforms import cifar_transform

    cfg = compose_config("data=cifar10", "data.randaugment=rand-m9-mstd0.5", "data.reprob=1.0").data
    transform = cifar_transform(cfg, train=True)
    names = [type(t).__name__ for t in [*transform.library, *transform.finish, *transform.after]]
    assert names == ["RandAugment", "ToTensor", "Normalize", "RandomErasing"]  # after the contract's crop and flip
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    first = transform(image, 0, 1, 5)
    assert first.shape == (3, 32, 32) and torch.equal(first, transform(image, 0, 1, 5))  # the sample's own seed
    assert not torch.equal(first, transform(image, 0, 2, 5))
    assert [type(t).__name__ for t in cifar_transform(cfg, train=False).transforms] == ["ToTensor", "Normalize"]


def test_imagenet_recipe_sizes(tmp_path):
    from data.transforms import imagenet_transform

    cfg = compose_config("data=imagenet", "data.root=/x", "data.image_size=64", "data.crop_pct=0.8").data
    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    assert imagenet_transform(cfg, train=True)(image, 0, 1, 0).shape == (3, 64, 64)
    random_mode = compose_config("data=imagenet", "data.root=/x", "data.image_size=64", "data.interpolation=random").data
    crops = [imagenet_transform(random_mode, train=True)(image, 0, 1, i) for i in range(4)]
    assert all(c.shape == (3, 64, 64) for c in crops)  # timm's per-image choice of bilinear or bicubic
    val = imagenet_transform(cfg, train=False)
    assert val.transforms[0].size == 80 and val(image).shape == (3, 64, 64)  # resize 64 / 0.8, crop 64


def test_every_image_mode_loads_as_8_bit_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    from data.folder import load_rgb

    gradient = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(gradient).save(tmp_path / "sixteen.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    for name in ("sixteen.png", "grey.png", "cmyk.jpg", "palette.png"):
        assert load_rgb(str(tmp_path / name)).mode == "RGB", name
    sixteen = np.asarray(load_rgb(str(tmp_path / "sixteen.png")))[..., 0].astype(int)
    assert sixteen.min() == 0 and sixteen.max() == 254 and (np.diff(sixteen.flatten()) >= 0).all()  # scaled, not clipped
    assert np.asarray(load_rgb(str(tmp_path / "grey.png")))[0, 0].tolist() == [77, 77, 77]
    assert np.abs(np.asarray(load_rgb(str(tmp_path / "cmyk.jpg")))[0, 0].astype(int) - [255, 0, 0]).max() < 8
    assert np.asarray(load_rgb(str(tmp_path / "palette.png")))[0, 0].tolist() == [10, 200, 30]


def test_a_batch_with_no_readable_image_is_passed_over_in_evaluation_and_refused_in_training():
    from data.corrupt import Skipped, collate_skipping, require_images
    from engine.trainer import build_precision, evaluate

    empty = collate_skipping([Skipped("cannot read image a.png"), Skipped("cannot read image b.png")])
    full = collate_skipping([(torch.zeros(3, 2, 2), 1), Skipped("cannot read image c.png")])
    result = evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), [full, empty],
                      build_precision("none", torch.device("cpu")))
    assert result["count"] == 1 and len(result["skipped"]) == 3
    require_images(full)
    with pytest.raises(DataError, match="every image of a training batch is unreadable, e.g. cannot read image a.png"):
        require_images(empty)


def test_imagenet_recipe_has_no_colour_jitter_unless_asked_and_erases_with_the_configured_fill():
    """The SE, CBAM, ECA and CA scripts train on crop + flip alone; timm's factory would add ColorJitter(0.4)."""
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import ColorJitter

    from data.transforms import imagenet_transform

    plain = imagenet_transform(compose_config("data=imagenet", "data.root=x").data, train=True)
    assert not any(isinstance(op, ColorJitter) for op in plain.library)
    jitter = imagenet_transform(compose_config("data=imagenet", "data.root=x", "data.color_jitter=0.4").data, True)
    assert [op.brightness for op in jitter.library if isinstance(op, ColorJitter)] == [(0.6, 1.4)]
    for mode in ("rand", "const"):
        erasing = imagenet_transform(compose_config("data=imagenet", "data.root=x", "data.reprob=0.25",
                                                    f"data.remode={mode}").data, True).after
        assert [(type(op), op.mode) for op in erasing] == [(RandomErasing, mode)]


def test_pinned_batches_keep_the_reasons_their_images_were_left_out(monkeypatch):
    """torch's pin_memory (the loaders pin on CUDA) rebuilds tuples; ``Batch`` carries its skipped files across."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from data.corrupt import Batch

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)  # no CUDA here
    pinned = pin_memory(Batch((torch.zeros(2, 3), torch.tensor([0, 1])), ["bad.jpg: truncated"]))
    assert isinstance(pinned, Batch) and pinned.skipped == ("bad.jpg: truncated",) and pinned[1].tolist() == [0, 1]


def test_num_workers_auto_shares_this_processes_cpus_among_the_local_processes(tmp_path, monkeypatch):
    from data import build_loaders
    from data.workers import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers("auto") == 2 and loader_workers(3) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers("auto") == 8
    assert compose_config("data=imagenet", "data.root=x").data.num_workers == "auto"
    assert compose_config("data=cifar10", "data.root=x").data.num_workers == "auto"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    cfg = folder_config(make_image_folder(tmp_path), "data.num_workers=auto", "data.in_memory=false")
    train_set, val_set = build_datasets(cfg)
    train, _ = build_loaders(cfg, train_set, val_set)
    assert train.num_workers == 2  # this machine's two cores, not the ImageNet recipe's former 8
