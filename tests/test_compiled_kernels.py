"""The torch.compile'd element-wise kernels in their smallest real form, in the default run.

Real runs take this path for every SmolLM2 q/v layer (``COMPILE="auto"`` compiles layers with at least 2**16
weights); here compilation is forced on a 10 -> 7 layer, two adapters (so both branches of the gradient kernel
run), with and without active dropout (the folded and the un-folded path). First call: about 20-40 s of
compilation on 2 cores with an empty inductor cache, about 3 s with a warm one.
"""
import os

import pytest
import torch
from torch import nn

import loran.autograd as la
from loran import LoranConfig, get_loran_model, loran_layers
from loran.variants import Path, choose_path

TOL = dict(rtol=2e-5, atol=2e-5)


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(10, 7)

    def forward(self, x):
        return self.q_proj(x)


def _model(memory_efficient: bool, dropout: float):
    """Sinter (s = 3) and tanh (s = 2.5) side by side, B drawn so that both are clearly non-linear."""
    common = dict(target_modules=["q_proj"], lora_dropout=dropout, memory_efficient=memory_efficient)
    model = get_loran_model(Proj(), LoranConfig(r=3, lora_alpha=9, activation="sinter",
                                                activation_kwargs={"amp": 0.5, "omega": 30.0}, **common))
    model.add_adapter("other", LoranConfig(r=2, lora_alpha=5, activation="tanh", **common))
    model.base_model.set_adapter(["default", "other"])
    gen = torch.Generator().manual_seed(1)
    for _, layer in loran_layers(model):
        for lin in layer.lora_B.values():
            lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * 0.5
    return model.train()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_kernels_equal_the_autograd_reference(monkeypatch, dropout):
    """Planted: `G.mul_(df(z))` (s dropped) in _fused_grad_kernel, or `s *` dropped in _fused_weight_kernel
    -> fails. Also fails if compilation falls back to eager ops (KERNELS.failed)."""
    monkeypatch.setattr(la, "COMPILE", "always")
    monkeypatch.setattr(la, "KERNELS", la._Kernels())  # this test's own compile state
    x = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(7))
    results = []
    for memory_efficient in (True, False):
        model = _model(memory_efficient, dropout)
        layer = model.base_model.model.q_proj
        xi = x.clone().requires_grad_()
        assert (choose_path(layer, xi).path is Path.FOLDED) == (memory_efficient and dropout == 0)
        torch.manual_seed(11)  # the same dropout masks on both paths
        y = model(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(8)))
        grads = [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
        assert len(grads) == 4
        results.append([y.detach(), xi.grad, *grads])
    assert la.KERNELS.compiled is not None
    # Under mutmut (make mutate) every function is a trampoline that dynamo cannot trace (fullgraph): the kernels
    # fall back to eager ops there, so only the numbers are checked.
    assert not la.KERNELS.failed or os.environ.get("MUTANT_UNDER_TEST") is not None
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, **TOL)
