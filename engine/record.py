"""What a run reports: metrics.json's records (epochs, evaluations, the test set), TensorBoard's scalars, HParams
and attention figures, and the unreadable images it left out."""
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from engine.distributed import all_gather_objects, all_reduce_sum
from engine.metrics import write_json
from engine.tensorboard import LazyWriter, log_hparams

log = logging.getLogger("attnlab")

# The final metrics the HParams table shows, where a run has them.
FINAL_KEYS = ("top1_err", "top5_err", "val_loss", "best_top1_err", "auroc", "test_top1_err", "test_top5_err")


def result_line(metrics: dict[str, Any]) -> str:
    """A run's result in words: the val error (and best) where it was evaluated each epoch, the test error."""
    parts = []
    if "top1_err" in metrics:
        best = f" (best {metrics['best_top1_err']:.2f}%)" if "best_top1_err" in metrics else ""
        parts.append(f"top-1 error {metrics['top1_err']:.2f}%{best}")
    if "test_top1_err" in metrics:
        parts.append(f"test top-1 error {metrics['test_top1_err']:.2f}% (final weights)")
    return f"{', '.join(parts) or 'no evaluation'} after {metrics['epoch']} epochs"


def epoch_metrics(result: dict[str, float], ema_result: dict[str, float] | None) -> dict[str, float]:
    """The metrics.json fields of one evaluation (and of the EMA weights' evaluation)."""
    out = {"top1_err": result["top1_err"], "top5_err": result["top5_err"], "val_loss": result["loss"],
           "val_images": result["count"], "eval_images_per_s": result["images_per_s"]}
    if "auroc" in result:  # multi-label data: mean AUROC beside the one-error
        out["auroc"] = result["auroc"]
    if ema_result:
        out.update(ema_top1_err=ema_result["top1_err"], ema_top5_err=ema_result["top5_err"])
    return out


def final_test_metrics(result: dict[str, float], ema_result: dict[str, float] | None) -> dict[str, float]:
    """The metrics.json fields of the test set's one evaluation: ``test_*``, its loss and image count last."""
    out = {f"test_{k}": v for k, v in epoch_metrics(result, ema_result).items()
           if k not in ("val_loss", "val_images")}
    return {**out, "test_loss": result["loss"], "test_images": result["count"]}


def train_record(epoch: int, stats: dict[str, Any], lr: float, device: torch.device) -> dict[str, Any]:
    """An epoch's history record of its training: the mean loss over every rank's batches, lr, speed."""
    totals = torch.tensor([stats["loss_sum"], stats["loss_steps"]], dtype=torch.float64, device=device)
    loss_sum, loss_steps = all_reduce_sum(totals).tolist()
    return {"epoch": epoch, "train_loss": loss_sum / max(loss_steps, 1), "lr": lr,
            "train_images_per_s": stats["images_per_s"]}


def add_skips(record: dict[str, Any], stats: dict[str, Any], eval_skipped: list[str], run_dir: Path,
              writes_outputs: bool) -> None:
    """Note in an epoch's record the updates ``on_nonfinite=skip`` left out and the unreadable images of every rank."""
    if stats["skipped_steps"]:
        record["skipped_steps"] = stats["skipped_steps"]
    skipped = gather_skipped(stats["skipped"] + eval_skipped)
    if skipped:
        record["skipped_images"] = report_skipped(run_dir, skipped, writes_outputs)


def gather_skipped(reasons: list[str]) -> list[str]:
    """The unreadable images every rank left out, once each."""
    return sorted({r for rank_reasons in all_gather_objects(reasons) for r in rank_reasons})


def report_skipped(run_dir: Path, reasons: list[str], writes_outputs: bool) -> int:
    """Log the images left out this epoch and add them to ``skipped_images.txt``; returns the total so far."""
    if not writes_outputs:
        return 0
    path = run_dir / "skipped_images.txt"
    known = set(path.read_text().splitlines()) if path.exists() else set()
    new = [r for r in reasons if r not in known]
    log.warning("left out %d unreadable image(s) (data.skip_corrupt=true), e.g. %s; all listed in %s",
                len(reasons), reasons[0], path)
    with open(path, "a") as f:
        f.writelines(r + "\n" for r in new)
    return len(known) + len(new)


def log_evaluation(writer: LazyWriter, result: dict, ema_result: dict | None, step: int) -> None:
    """The val/* TensorBoard scalars of one evaluation."""
    writer.add_scalar("val/top1_err", result["top1_err"], step)
    writer.add_scalar("val/top5_err", result["top5_err"], step)
    writer.add_scalar("val/loss", result["loss"], step)
    if result.get("auroc") is not None:
        writer.add_scalar("val/auroc", result["auroc"], step)
    if ema_result:
        writer.add_scalar("val/ema_top1_err", ema_result["top1_err"], step)


def log_attention_maps(writer: LazyWriter, model: nn.Module, val_loader, data_cfg, count: int, step: int) -> None:
    """The first ``count`` val images' attention maps and Grad-CAM, as TensorBoard images."""
    images = next((x for x, _ in val_loader if x is not None), None)  # skip all-unreadable batches
    if images is None:
        return
    from data.transforms import unnormalise
    from engine.visualize import log_attention_figures  # captum and matplotlib: imported only when maps are asked for

    images = images[:count].cpu()
    device = next(model.parameters()).device
    log_attention_figures(writer, model, images.to(device), unnormalise(images, data_cfg.mean, data_cfg.std), step)


def write_final(metrics: dict[str, Any], run_dir: Path, writes_outputs: bool, writer: LazyWriter | None,
                cfg: DictConfig) -> dict[str, Any]:
    """Write the final metrics.json and the HParams summary; return the metrics."""
    if writes_outputs:
        write_json(run_dir / "metrics.json", metrics)
        if writer is not None:
            final = {f"final/{k}": metrics[k] for k in FINAL_KEYS if metrics.get(k) is not None}
            log_hparams(writer, OmegaConf.to_container(cfg, resolve=True), final)
    return metrics
