"""The training loop a user writes by hand, the reference that ``scripts/benchmark.py`` times train.py against.

Usage: python scripts/plain_loop.py ROOT --train-samples N --val-samples M [--epochs E] [--batch B]
       [--workers W] [train.py overrides for the model, e.g. model=resnet20 attention=se]

torchvision's ImageFolder with RandomCrop(32, padding=4) + flip + ToTensor + Normalize, a DataLoader
with worker processes, SGD with momentum, fp32, on the GPU when there is one, one evaluation pass
after each epoch. The model is
attnlab's (the same one train.py builds); the image subset is the one train.py picks for
``data.max_train_samples`` / ``data.max_val_samples``, so both read the same files.
"""
import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as T

from _project import use_project

use_project()  # before the project's own imports

from _config import compose_from_argv  # noqa: E402
from data.samplers import balanced_indices  # noqa: E402
from models import build_model  # noqa: E402


def folder_subset(root: str, split: str, transform, samples: int | None) -> torch.utils.data.Dataset:
    """``root/split`` as an ImageFolder, cut to train.py's class-balanced subset of ``samples``."""
    folder = datasets.ImageFolder(f"{root}/{split}", transform=transform)
    return Subset(folder, balanced_indices(folder.targets, samples)) if samples else folder


def main() -> None:
    """Train and evaluate as a hand-written script would; print the wall time and the last top-1 error."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--val-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args, overrides = parser.parse_known_args()
    start = time.perf_counter()
    cfg = compose_from_argv(["data=cifar10", *overrides])
    normalize = T.Normalize(tuple(cfg.data.mean), tuple(cfg.data.std))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.ToTensor(), normalize])
    train_set = folder_subset(args.root, "train", train_tf, args.train_samples)
    val_set = folder_subset(args.root, "val", val_tf, args.val_samples)
    loader_args = {"num_workers": args.workers, "persistent_workers": args.workers > 0,
                   "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train_set, args.batch, shuffle=True, **loader_args)
    val_loader = DataLoader(val_set, 2 * args.batch, **loader_args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes,
                        cfg.data.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    criterion = nn.CrossEntropyLoss()
    for _ in range(args.epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
    print(f"top-1 error {100 * (1 - correct / total):.2f}%, wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
