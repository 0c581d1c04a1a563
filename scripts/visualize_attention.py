"""Render what each attention block attends to, and Grad-CAM, as PNGs of the input image's size.

Usage: python scripts/visualize_attention.py [checkpoint=PATH] [images=[a.jpg,b.png]] [num_images=4]
           [query=[0.5,0.5]] [out=DIR] [gradcam=true] <train.py overrides>
The model comes from the checkpoint (architecture and weights) or from the overrides (random weights);
the images from ``images`` or the first ``num_images`` of the configured val set. Per image and block:
channel gates (SE, ECA, CBAM's channel gate) as per-channel strips; spatial masks (CBAM's spatial gate,
coordinate attention's a_h x a_w, residual attention's mask, GC's context weights, STN's sampling
density) as heat maps over the image; for non-local, criss-cross, DANet, MHSA, SASA and outlook
attention the weights of the ``query`` position (row, column as fractions; a white cross). Written to
``out/<image>/<block>__<map>.png`` (default out: visualizations/); the last line printed is JSON.
"""
import json
import sys
from pathlib import Path

from _inputs import load_images, load_model, split_args
from PIL import Image

from engine.visualize import render_attention, render_gradcam

DEFAULTS = {"checkpoint": None, "images": None, "num_images": 4, "query": [0.5, 0.5], "out": "visualizations",
            "gradcam": True}


def main(argv: list[str]) -> int:
    """Render and save every map; print where they went."""
    args, overrides = split_args(argv, DEFAULTS)
    model, cfg = load_model(overrides, args["checkpoint"])
    inputs, display, names = load_images(cfg, args["images"], args["num_images"])
    rendered = render_attention(model, inputs, display, tuple(args["query"]))
    if args["gradcam"]:
        for per_image, cam in zip(rendered, render_gradcam(model, inputs, display)):
            per_image["gradcam"] = cam
    written = []
    for name, per_image in zip(names, rendered):
        folder = Path(args["out"]) / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, array in per_image.items():
            path = folder / (key.replace(": ", "__").replace(" ", "_").replace("/", "_") + ".png")
            Image.fromarray(array).save(path)
            written.append(str(path))
    blocks = sorted({k.split(": ")[0] for p in rendered for k in p if ": " in k})
    print(f"{len(written)} images for {len(names)} inputs and {len(blocks)} blocks in {args['out']}/")
    print(json.dumps({"files": written, "blocks": blocks}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
