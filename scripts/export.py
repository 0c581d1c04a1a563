"""Export models to ONNX (opset 18) and with torch.export, and check onnxruntime against eager PyTorch.

Usage:
  python scripts/export.py --all [--out DIR]
      every registered block on every small backbone (the every-block tests' instances, 32x32): ONNX dynamic in
      the batch and, where the graph allows, the image size; onnxruntime against eager at two batch sizes (and
      a second image size); torch.export. Prints a markdown table and writes DIR/export_report.md.
  python scripts/export.py --checkpoint RUN/checkpoints/last.pt [--num-images 8] [--out DIR] [OVERRIDE ...]
      exports a trained checkpoint's model to DIR/model.onnx and checks it on the first val images of its data
      set (train.py's overrides, e.g. data.root=..., say where the data is).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from _project import use_project

use_project()  # before the project's own imports

from _config import write_file  # noqa: E402
from _inputs import load_images, load_model  # noqa: E402
from engine.export import RTOL, check_export, export_onnx, matches, onnx_difference, small_pair  # noqa: E402
from models.attention import ATTENTION_BLOCKS  # noqa: E402
from models.backbones import SMALL_OPTIONS  # noqa: E402


def report_row(backbone: str, block: str) -> dict:
    """One pair's export outcome as a table row."""
    start = time.perf_counter()
    try:
        check = check_export(small_pair(backbone, block), 32)
    except Exception as e:  # noqa: BLE001 - a pair the backbone refuses (no place for the block) is reported
        return {"backbone": backbone, "block": block, "onnx": "-", "note": f"not built: {str(e).splitlines()[0][:120]}"}
    row = {"backbone": backbone, "block": block, "onnx": "yes" if matches(check) else "no",
           "dynamic size": "yes" if check.dynamic_size else "batch only",
           "max diff": f"{check.max_diff:.1e}" if check.max_diff is not None else "-",
           "torch.export": "yes" if check.torch_export else "no", "seconds": round(time.perf_counter() - start, 1)}
    if check.error:
        row["note"] = check.error
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    keys = ["backbone", "block", "onnx", "dynamic size", "max diff", "torch.export", "seconds", "note"]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def export_all(out: Path) -> int:
    """The whole matrix; exit status 1 if a pair that was built does not export and match."""
    rows = []
    for backbone in sorted(SMALL_OPTIONS):
        for block in ["none", *sorted(ATTENTION_BLOCKS)]:
            rows.append(report_row(backbone, block))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    summary = (f"{sum(r['onnx'] == 'yes' for r in rows)} of {sum(r['onnx'] != '-' for r in rows)} built pairs "
               f"export and match onnxruntime within {RTOL:g} of the outputs' size")
    write_file(out / "export_report.md", lambda f: f.write((summary + "\n\n" + table + "\n").encode()))
    print(summary + "\n\n" + table)
    return 0 if all(r["onnx"] != "no" for r in rows) else 1


def export_checkpoint(checkpoint: str, overrides: list[str], num_images: int, out: Path) -> int:
    """A trained checkpoint's model to ONNX, checked on val images against the checkpoint's own outputs."""
    model, cfg = load_model(overrides, checkpoint)
    inputs, _, _, _ = load_images(cfg, None, num_images)
    onnx_model = export_onnx(model, inputs[:2], dynamic_size=False)
    write_file(out / "model.onnx", lambda f: f.write(onnx_model))
    difference = onnx_difference(model, onnx_model, [inputs])
    print(json.dumps({"onnx": str(out / "model.onnx"), "images": len(inputs), "max_diff": difference,
                      "matches": difference <= RTOL}))
    return 0 if difference <= RTOL else 1


def main(argv: list[str]) -> int:
    """Export the whole matrix (``--all``) or one checkpoint (``--checkpoint``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every block on every small backbone")
    parser.add_argument("--checkpoint", default=None, help="an attnlab checkpoint to export")
    parser.add_argument("--num-images", type=int, default=8, help="val images the checkpoint's export is checked on")
    parser.add_argument("--out", type=Path, default=Path("export"))
    args, overrides = parser.parse_known_args(argv)
    if args.all == bool(args.checkpoint):
        parser.error("give --all or --checkpoint PATH")
    if args.all:
        return export_all(args.out)
    return export_checkpoint(args.checkpoint, overrides, args.num_images, args.out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
