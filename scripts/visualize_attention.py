"""One figure per image of what every attention block attends to, with Grad-CAM.

Usage: python scripts/visualize_attention.py [checkpoint=PATH] [images=[a.jpg,b.png]] [num_images=4]
           [query=[0.5,0.5]] [out=DIR] [gradcam=true] <train.py overrides>
The model comes from the checkpoint (architecture and weights) or from the overrides (random weights);
the images from ``images`` or the first ``num_images`` of the configured val set. Each figure shows the
input large, Grad-CAM over it, then every block's map upsampled onto the input in a grid, titled with
its stage, unit, position, block and map: spatial masks (CBAM's spatial gate, coordinate attention's
a_h x a_w, residual attention's mask, GC's context weights, STN's sampling density) and, for
non-local, criss-cross, DANet, MHSA, SASA and outlook attention, the weights of the ``query`` position
(row, column as fractions; a white cross); channel gates (SE, ECA, CBAM's channel gate) as one strip
per block. Written to ``out/<image>.png`` (default out: visualizations/); the last line printed is JSON.
"""
import json
import sys
from pathlib import Path

from _project import use_project

use_project()  # before the project's own imports

from _config import write_file  # noqa: E402
from _inputs import load_images, load_model, split_args  # noqa: E402
from engine.visualize import attention_figure, collect_maps, gradcam  # noqa: E402

DEFAULTS = {"checkpoint": None, "images": None, "num_images": 4, "query": [0.5, 0.5], "out": "visualizations",
            "gradcam": True}


def main(argv: list[str]) -> int:
    """Render and save one figure per image; print where they went."""
    args, overrides = split_args(argv, DEFAULTS)
    model, cfg = load_model(overrides, args["checkpoint"])
    inputs, display, names, classes = load_images(cfg, args["images"], args["num_images"])
    query = tuple(args["query"])
    maps = collect_maps(model, inputs, query)
    cams, predicted = gradcam(model, inputs) if args["gradcam"] else ([None] * len(inputs), None)
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for b, (name, image_maps) in enumerate(zip(names, maps)):
        title = f"{name}: {cfg.model.name} + {cfg.attention.name}"
        if predicted is not None:
            k = int(predicted[b])
            title += f", predicted class {k}" + (f" ({classes[k]})" if classes and k < len(classes) else "")
        fig = attention_figure(display[b], image_maps, cams[b], title, query)
        path = out / f"{name}.png"
        write_file(path, lambda f, fig=fig: fig.savefig(f, format="png", bbox_inches="tight"))
        written.append(str(path))
    panels = [[f"{m.place} · {m.block} · {m.name}" for m in image_maps] for image_maps in maps]
    print(f"{len(written)} figures, {len(panels[0]) if panels else 0} maps each, in {out}/")
    print(json.dumps({"files": written, "maps": panels[0] if panels else []}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
