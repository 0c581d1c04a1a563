"""torch.compile: the models trace into whole graphs (dynamo's explain, no compiler needed), so inductor
compiles each backbone and block as one graph on CUDA."""
import pytest
import torch
import torch._dynamo as dynamo

from models import build_model
from models.backbones.base import SMALL_OPTIONS


@pytest.mark.parametrize("backbone,attention", [
    ("resnet20", "se"), ("resnet20", "nonlocal"), ("resnet20", "mhsa"), ("resnet20", "criss_cross"),
    ("mobilenetv2", "coord"), ("volo_d1", "none"),
])
def test_a_training_forward_has_no_graph_breaks(backbone, attention):
    model = build_model({"name": backbone, **SMALL_OPTIONS[backbone]}, {"name": attention}, num_classes=10,
                        image_size=32).train()  # as train.py builds it: MHSA's tables fitted to their maps
    dynamo.reset()
    explained = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]


def test_compiled_mix_token_draws_a_new_box_every_step_as_eager_does():
    """MixToken draws from numpy inside the forward: compiled, it must not bake one box into the graph."""
    import numpy as np

    model = build_model({"name": "volo_d1", **SMALL_OPTIONS["volo_d1"], "mix_token": True}, {"name": "none"},
                        num_classes=10).train()
    compiled, x = torch.compile(model, backend="eager"), torch.randn(2, 3, 32, 32)
    np.random.seed(0)
    boxes = [compiled(x).box for _ in range(4)]
    np.random.seed(0)
    assert boxes == [model(x).box for _ in range(4)] and len(set(boxes)) > 1
