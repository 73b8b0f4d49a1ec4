"""torch.compile sees whole graphs: no graph breaks, and no recompilation when resolutions alternate."""
import pytest
import timm
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import vitpe  # noqa: F401


@pytest.mark.parametrize("pos", ["learned", "rope_mixed", "rpb+peg", "mixffn+rope_axial", "sincos2d"])
def test_no_graph_breaks_and_no_recompiles_across_two_resolutions(pos):
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos=pos, depth=1, num_classes=3)
    dynamo.reset()
    explained = dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for size in (64, 96, 64, 96, 64, 96):
        compiled(torch.randn(1, 3, size, size))
        graphs.append(counters["stats"]["unique_graphs"])
    # one graph for the first size, one (dynamic) for the second, none after
    assert graphs[1:] == [graphs[1]] * 5 and graphs[1] <= 2, graphs
