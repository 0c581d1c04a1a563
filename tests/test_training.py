"""End-to-end runs through engine.run.train: every output, the real data, every block and backbone, multi-label
data, unreadable images."""
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.complexity import count_macs
from engine.run import train
from models import ConfigError, build_model
from tests.helpers import compose_config, corrupt_folder, read_metrics

# --- end to end on digits -----------------------------------------------------------------------

def test_two_epochs_on_digits_write_every_output(quick_config, tmp_path):
    # 16 steps in all: 4 (the QUICK slice) leave the model at chance level
    cfg = quick_config("trainer.epochs=2", "trainer.ema=true", "trainer.ema_decay=0.9", "data.max_train_samples=1024")
    metrics = train(cfg, tmp_path)
    on_disk = read_metrics(tmp_path)
    assert on_disk == json.loads(json.dumps(metrics)) and on_disk["status"] == "completed"
    assert on_disk["epoch"] == 2 and on_disk["top1_err"] < 90  # better than chance on 10 classes
    for key in ("top5_err", "val_loss", "best_top1_err", "ema_top1_err", "train_images_per_s", "eval_images_per_s"):
        assert isinstance(on_disk[key], float)
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, 10)
    assert on_disk["params"] == sum(p.numel() for p in model.parameters())
    assert on_disk["macs"] == count_macs(model, (3, 32, 32)) and isinstance(on_disk["macs"], int)
    saved = (tmp_path / "config.yaml").read_text()
    assert "${" not in saved and "stem: cifar" in saved
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(tmp_path / "checkpoints" / name)["epoch"] in (1, 2)
    history = on_disk["history"]  # the run's curve, readable without its checkpoint
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["top1_err"] == on_disk["top1_err"]
    assert history == json.loads(json.dumps(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["history"]))
    assert on_disk["best_top1_err"] == min(h["top1_err"] for h in history)
    assert history[0]["lr"] > history[1]["lr"] >= 0  # the cosine schedule's lr at each epoch's end
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "val/top1_err", "val/top5_err", "val/loss"} <= tags
    assert len(events.Scalars("val/top1_err")) == 2
    hparams = events.PluginTagToContent("hparams")
    assert hparams and len(list((tmp_path / "tensorboard").iterdir())) == 1  # one event file holds it all


def test_sync_batch_norm_on_the_cpu_is_refused_with_the_alternative(quick_config, tmp_path):
    with pytest.raises(ConfigError, match="trainer.sync_bn=true needs CUDA devices; on the CPU use model.norm=group"):
        train(quick_config("trainer.sync_bn=true", "trainer.device=cpu"), tmp_path)


def test_eval_only_without_a_checkpoint_is_a_config_error(quick_config, tmp_path):
    with pytest.raises(ConfigError, match="trainer.eval_only=true trainer.resume=null do not go together: use trainer.eval_only=true with trainer.resume="):
        train(quick_config("trainer.eval_only=true"), tmp_path)


@pytest.mark.slow
def test_short_run_on_a_slice_of_the_shared_cifar10(cifar10_root, tmp_path):
    cfg = compose_config("data=cifar10", f"data.root={cifar10_root}", "data.max_train_samples=1000",
                         "data.max_val_samples=500", "data.num_workers=2", "trainer.epochs=2",
                         "trainer.progress=false", "model=resnet20", "attention=se")
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["epoch"] == 2
    assert metrics["top1_err"] < 90  # learns something in two short epochs


@pytest.mark.slow
def test_bf16_keeps_fp32_accuracy_on_a_slice_of_the_shared_cifar10(cifar10_root, tmp_path):
    """The CIFAR recipe's bf16 autocast + channels_last against fp32, same seed: within 2 points of top-1.

    Measured on the development CPU (docs/speed.md): |difference| 0.95 here (one epoch), 0.65 to 2.3 points
    across the seeds, batches and epochs tried, comparable to fp32's own seed-to-seed spread at this length.
    """
    common = (f"data.root={cifar10_root}", "data=cifar10", "model=resnet20", "attention=none",
              "data.max_train_samples=5000", "data.max_val_samples=2000", "data.batch_size=32", "trainer.epochs=1",
              "trainer.progress=false")
    fp32 = train(compose_config(*common), tmp_path / "fp32")
    bf16 = train(compose_config(*common, "trainer.amp=bf16", "trainer.channels_last=true"), tmp_path / "bf16")
    assert fp32["top1_err"] < 80 and abs(bf16["top1_err"] - fp32["top1_err"]) <= 2.0, (fp32, bf16)


def test_mixup_cutmix_and_label_smoothing_train(quick_config, tmp_path):
    metrics = train(quick_config("trainer.epochs=1", "data.mixup=0.2", "data.cutmix=1.0",
                                 "data.label_smoothing=0.1", "optim=adamw", "optim.lr=1e-3"), tmp_path)
    assert metrics["status"] == "completed" and 0 < metrics["train_loss"] < 10


@pytest.mark.gpu
def test_fp16_amp_channels_last_on_cuda(quick_config, tmp_path):
    metrics = train(quick_config("trainer.epochs=1", "trainer.device=cuda", "trainer.amp=fp16",
                                 "trainer.channels_last=true"), tmp_path)
    assert metrics["status"] == "completed" and metrics["top1_err"] < 90


@pytest.mark.slow
@pytest.mark.parametrize("block", ["cbam", "eca", "coord", "gc", "nonlocal", "criss_cross", "danet",
                                   "residual_attention", "stn", "mhsa", "sasa", "outlook"])
def test_every_block_trains_with_its_paper_defaults(quick_config, tmp_path, block):
    """`python train.py attention=<block>` on the default model and data, cut to two steps (SASA's
    unfolded windows take a quarter of a second an image on one CPU thread)."""
    metrics = train(quick_config(f"attention={block}", "trainer.epochs=1", "data.max_train_samples=32",
                                 "data.batch_size=16", "data.max_val_samples=16"), tmp_path)
    assert metrics["status"] == "completed" and torch.isfinite(torch.tensor(metrics["train_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("block", ["cbam", "eca", "gc"])
def test_blocks_learn_on_a_slice_of_the_shared_cifar10(cifar10_root, tmp_path, block):
    cfg = compose_config("data=cifar10", f"data.root={cifar10_root}", "data.max_train_samples=1000",
                         "data.max_val_samples=500", "data.num_workers=1", "trainer.epochs=2",
                         "trainer.progress=false", "model=resnet20", f"attention={block}")
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["top1_err"] < 90


class NeedsNineByNine(nn.Module):
    """A block that, like some attention layers, cannot run on maps smaller than 9x9 (ResNet-20 ends at 8x8)."""

    positions = frozenset({"standard"})
    default_position = "standard"

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 9)

    def forward(self, x):
        return x + self.conv(x).mean()


def test_a_size_a_block_cannot_take_fails_before_training(quick_config, tmp_path, monkeypatch):
    import models.placement

    monkeypatch.setitem(models.placement.ATTENTION_BLOCKS, "needs9", NeedsNineByNine)
    cfg = quick_config("attention=none", "attention.name=needs9", "trainer.epochs=1")
    with pytest.raises(ConfigError, match="cannot run on 32x32 inputs .*check data.image_size and model.stem"):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_mobilenetv2_with_coordinate_attention_trains(quick_config, tmp_path):
    metrics = train(quick_config("model=mobilenetv2", "attention=coord", "trainer.epochs=1"), tmp_path)
    assert metrics["status"] == "completed" and metrics["params"] > 2_000_000


@pytest.mark.slow
@pytest.mark.parametrize("overrides,samples,epochs,learns", [
    (("model=mobilenext", "model.width_mult=0.5", "attention=coord", "optim.lr=0.05"), 1000, 2, True),
    # 1.9 GMACs a 32x32 image: one short epoch, a few val images
    (("model=volo_d1", "attention=none", "optim=adamw", "optim.lr=5e-4", "data.max_val_samples=32"), 128, 1, False),
    (("model=agcnn", "model.backbone=resnet20", "model.stage_fractions=[1,1,1]", "attention=se"), 600, 3, True),
], ids=["mobilenext", "volo_d1", "agcnn"])
def test_new_backbones_train_on_a_slice_of_the_shared_cifar10(cifar10_root, tmp_path, overrides, samples, epochs,
                                                               learns):
    cfg = compose_config("data=cifar10", f"data.root={cifar10_root}", f"data.max_train_samples={samples}",
                         "data.max_val_samples=200", "data.num_workers=1", "data.batch_size=32",
                         f"trainer.epochs={epochs}", "trainer.progress=false", *overrides)
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["epoch"] == epochs
    assert math.isfinite(metrics["train_loss"])
    if learns:
        assert metrics["top1_err"] < 90


def test_evaluation_logs_attention_maps_to_tensorboard(quick_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(quick_config("attention=cbam", "trainer.epochs=1", "trainer.attention_maps=2",
                       "data.max_train_samples=64"), tmp_path)
    events = EventAccumulator(str(next((tmp_path / "tensorboard").glob("events*"))), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert set(tags) == {"attention/image0", "attention/image1"}  # one figure per image
    figure = events.Images("attention/image0")[0]
    assert figure.width > 1000 and figure.height > 1000  # the input, Grad-CAM, nine maps and nine strips


# --- multi-label data (AG-CNN's setting) -----------------------------------------------------------

def test_multilabel_evaluation_is_one_error_and_binary_cross_entropy():
    from engine.trainer import build_precision, evaluate

    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 9.0]])
    targets = torch.tensor([[1.0, 0, 0], [1.0, 0, 1], [0, 0, 0], [0, 1.0, 0]])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x.long().flatten()]

    loader = [(torch.arange(4.0)[:, None], targets)]
    result = evaluate(Fixed(), loader, build_precision("none", torch.device("cpu")))
    # image 2 has no label: not scored. Top-1: image 0 hit, 1 miss (class 1), 3 miss (class 2) -> 2/3 err
    assert result["top1_err"] == pytest.approx(100 * 2 / 3)
    assert result["top5_err"] == pytest.approx(0.0)  # with 3 classes every label is in the top 5
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert result["loss"] == pytest.approx(bce.item(), rel=1e-6)
    # AUROC per class = the share of (positive, negative) pairs ranked right, ties half: class 0 positives
    # score 3, 0 against negatives 1, 0 -> (1 + 1 + 0 + 0.5) / 4; class 1: 0 against 2, 5, 2 -> 0; class 2: 1
    # against 1, 3, 9 -> 0.5 / 3
    assert result["auroc"] == pytest.approx((2.5 / 4 + 0 + 0.5 / 3) / 3)


def test_multilabel_auroc_is_over_the_scores_of_every_rank(monkeypatch):
    import engine.trainer
    from engine.trainer import build_precision, evaluate

    logits, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    other_rank = torch.stack([torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])
    monkeypatch.setattr(engine.trainer, "all_gather_objects", lambda mine: [mine, other_rank])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x.long().flatten()]

    result = evaluate(Fixed(), [(torch.arange(2.0)[:, None], targets)], build_precision("none", torch.device("cpu")))
    from sklearn.metrics import roc_auc_score

    both = torch.cat([torch.stack([logits, targets]), other_rank], 1)
    assert result["auroc"] == pytest.approx(roc_auc_score(both[1].numpy(), both[0].numpy(), average="macro"))
    assert result["auroc"] != pytest.approx(1.0)  # this rank's scores alone rank perfectly
    monkeypatch.setattr(engine.trainer, "all_gather_objects", lambda mine: [mine, None, other_rank])  # a rank with none
    again = evaluate(Fixed(), [(torch.arange(2.0)[:, None], targets)], build_precision("none", torch.device("cpu")))
    assert again["auroc"] == pytest.approx(result["auroc"])


def write_multilabel_set(root: Path, per_split: dict[str, int]) -> None:
    """Images whose labels are the colour channels they light up: red, green, blue or none."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    (root / "img").mkdir(parents=True)
    for split, n in per_split.items():
        rows = ["image,labels"]
        for i in range(n):
            on = torch.rand(3, generator=rng) > 0.5
            pixels = (on.float()[None, None] * 200 + torch.rand(32, 32, 3, generator=rng) * 55).byte().numpy()
            name = f"img/{split}{i}.png"
            Image.fromarray(pixels).save(root / name)
            rows.append(f"{name},{'|'.join(c for c, o in zip(('red', 'green', 'blue'), on) if o)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
def test_agcnn_trains_on_multilabel_data_with_binary_cross_entropy(tmp_path):
    write_multilabel_set(tmp_path / "data", {"train": 96, "val": 32})
    cfg = compose_config("model=agcnn", "model.backbone=resnet20", "model.stage_fractions=[2,1,1]",
                         "attention=se", "data=multilabel_csv", f"data.root={tmp_path / 'data'}",
                         "data.classes=[red,green,blue]", "data.num_classes=3", "data.image_size=32",
                         "data.stem=cifar", "data.batch_size=16", "data.num_workers=0", "trainer.epochs=4",
                         "trainer.progress=false")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and math.isfinite(metrics["val_loss"])
    assert metrics["top1_err"] < 50  # the colours are easy: most images' top class is one of theirs
    assert 0.5 < metrics["auroc"] <= 1 and metrics["history"][-1]["auroc"] == metrics["auroc"]


def test_multilabel_csv_names_a_missing_file_and_unknown_labels(tmp_path):
    from data import build_datasets
    from errors import DataError

    cfg = compose_config("data=multilabel_csv", f"data.root={tmp_path}", "data.classes=[a,b]", "data.num_classes=2")
    with pytest.raises(DataError, match="train.csv does not exist"):
        build_datasets(cfg.data)
    (tmp_path / "train.csv").write_text("image,labels\nx.png,a|c\n")
    (tmp_path / "val.csv").write_text("image,labels\n")
    with pytest.raises(DataError, match=r"train.csv:2: unknown label\(s\) c; data.classes lists a, b"):
        build_datasets(cfg.data)
    (tmp_path / "train.csv").write_text("image,labels\nx.png,a|b\n")
    with pytest.raises(ConfigError, match="multi_label=true takes no data.mixup"):
        train(compose_config("data=multilabel_csv", f"data.root={tmp_path}", "data.classes=[a,b]",
                             "data.num_classes=2", "data.mixup=0.2"), tmp_path / "run")


def test_skip_corrupt_leaves_bad_images_out_and_reports_them(tmp_path):
    bad = corrupt_folder(tmp_path / "data")
    overrides = ("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_classes=2", "data.image_size=32",
                 "data.stem=cifar", "data.num_workers=2", "data.batch_size=4", "trainer.epochs=2",
                 "trainer.progress=false")
    with pytest.raises(Exception, match="cannot read image"):  # without the option: stop, naming the file
        train(compose_config(*overrides), tmp_path / "strict")
    metrics = train(compose_config(*overrides, "data.skip_corrupt=true"), tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["skipped_images"] == 3
    assert metrics["val_images"] == 16  # 18 files, 2 unreadable: counted once each, never substituted
    listed = (tmp_path / "run" / "skipped_images.txt").read_text()
    assert all(str(p) in listed for p in bad) and len(listed.splitlines()) == 3  # once each over two epochs
