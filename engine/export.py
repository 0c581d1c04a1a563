"""A model out of PyTorch: ONNX through torch's dynamo exporter (opset 18: outlook's fold needs Col2Im), checked
in onnxruntime against the eager model, and ``torch.export``."""
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

OPSET = 18
RTOL, ATOL = 1e-4, 1e-5  # of the outputs' size: float32 reassociation in onnxruntime's kernels


def small_pair(backbone: str, block: str) -> nn.Module:
    """``block`` (in the last stage) on the every-block tests' small instance of ``backbone``, for 32x32 images,
    in eval mode."""
    from models import build_model
    from models.backbones import SMALL_OPTIONS

    torch.manual_seed(0)
    attention = {"name": block, "stages": [-1]} if block != "none" else {"name": "none"}
    return build_model({"name": backbone, **SMALL_OPTIONS[backbone]}, attention, num_classes=10, image_size=32).eval()


@dataclass
class ExportCheck:
    """One export's outcome: what was exported, the largest difference from eager, and why not where it failed."""

    onnx: bool
    dynamic_size: bool  # the graph takes other image sizes too, not only other batch sizes
    max_diff: float | None = None  # over the outputs' largest magnitude
    torch_export: bool = False
    error: str | None = None


def _dims(dynamic_size: bool) -> dict[str, dict[int, torch.export.Dim]]:
    """The exporter's dynamic dimensions: the batch, and the image's height and width where asked."""
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=16, max=2048), 3: torch.export.Dim("width", min=16, max=2048)})
    return {"x": dims}


def export_onnx(model: nn.Module, example: torch.Tensor, dynamic_size: bool) -> bytes:
    """The eval-mode ``model`` as an ONNX model (bytes), dynamic in the batch (and the image size)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes about its own internals
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=_dims(dynamic_size), verbose=False)
    return program.model_proto.SerializeToString()


def onnx_difference(model: nn.Module, onnx_model: bytes, inputs: list[torch.Tensor]) -> float:
    """The largest |onnxruntime - eager| over ``inputs``, relative to the eager outputs' largest magnitude."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = model.eval()(x).numpy()
            got = session.run(None, {name: x.numpy()})[0]
            worst = max(worst, float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)))
    return worst


def check_export(model: nn.Module, side: int, in_chans: int = 3, dynamic_size: bool = True) -> ExportCheck:
    """Export ``model`` (built for ``side``-pixel images) to ONNX and with ``torch.export``; compare onnxruntime
    with eager at two batch sizes, and at a second image size where the graph takes one. A graph that does not
    take other sizes (tables fitted to one map, VOLO's fixed token grid) is exported at its own size."""
    torch.manual_seed(0)
    example = torch.randn(2, in_chans, side, side)
    check = ExportCheck(onnx=False, dynamic_size=dynamic_size)
    try:
        onnx_model = export_onnx(model, example, dynamic_size)
    except Exception as e:  # noqa: BLE001 - the reason is the report
        if not dynamic_size:
            return ExportCheck(False, False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")
        return check_export(model, side, in_chans, dynamic_size=False)
    check.onnx, check.max_diff = True, onnx_difference(model, onnx_model, [example, torch.randn(3, in_chans, side, side)])
    if dynamic_size:
        try:
            other = onnx_difference(model, onnx_model, [torch.randn(1, in_chans, side + 16, side + 16)])
        except Exception:  # noqa: BLE001 - the model (or its graph) takes one image size only
            other = float("inf")
        if other > RTOL + ATOL:  # exported, but not for another size: a shape the trace fixed
            return check_export(model, side, in_chans, dynamic_size=False)
        check.max_diff = max(check.max_diff, other)
    try:
        with torch.no_grad():
            torch.export.export(model.eval(), (example,))
        check.torch_export = True
    except Exception as e:  # noqa: BLE001
        check.error = f"torch.export: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    return check


def matches(check: ExportCheck) -> bool:
    """Whether the export ran and onnxruntime agrees with eager within ``RTOL`` (plus ``ATOL``)."""
    return check.onnx and check.max_diff is not None and check.max_diff <= RTOL + ATOL
