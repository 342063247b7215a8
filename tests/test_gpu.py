"""The CUDA path (marked `gpu`, skipped without CUDA; `make gpu-check` runs them): the fused/compiled LoRAN path on
nn.Linear and on an NF4 base (bitsandbytes' CUDA kernels) against the plain-autograd reference, in float32 and under
bf16 autocast, forward and gradients; merge/unmerge; the per-rank device map; the precision policy on CUDA."""
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by make gpu-check)")]

from loran import LoranConfig, get_loran_model  # noqa: E402
from loran import autograd as la  # noqa: E402

SINTER = {"activation": "sinter", "activation_kwargs": {"amp": 0.5, "omega": 30.0}}


def _toy(kind: str):
    from test_loran_peft import make_toy

    model = make_toy(kind)
    return model.cuda() if kind == "fp32" else model.to("cuda")


def _adapted(kind: str, memory_efficient: bool, dropout: float = 0.0, **config):
    model = get_loran_model(_toy(kind), LoranConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                    target_modules=["q_proj", "v_proj"],
                                                    memory_efficient=memory_efficient, **{**SINTER, **config}))
    gen = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=gen) * 0.5).to(p.device)
    return model.train()


def _run(model, autocast: bool):
    from test_loran_peft import X

    x = X.cuda().clone().requires_grad_()
    torch.manual_seed(3)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().sum().backward()
    return [y.detach().float(), x.grad.float()] + [p.grad for _, p in sorted(model.named_parameters())
                                                   if p.requires_grad]


@pytest.mark.parametrize("compile_mode", ["always", "never"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_fast_path_on_cuda_equals_reference(monkeypatch, kind, autocast, compile_mode):
    monkeypatch.setattr(la, "COMPILE", compile_mode)
    fast, ref = (_run(_adapted(kind, me), autocast) for me in (True, False))
    assert not la.KERNELS.failed, "torch.compile of the fused kernels failed on CUDA"
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_identity_rows_equal_on_cuda_under_bf16_autocast(kind):
    for policy in ("float32", "autocast"):
        runs = [_run(_adapted(kind, True, 0.1, update_dtype=policy, **act), True)
                for act in ({"activation": "identity", "activation_kwargs": {}},
                            {"activation": "sinter", "activation_kwargs": {"amp": 0.0}})]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_merge_and_unmerge_on_cuda():
    model = _adapted("fp32", True).eval()
    layer = model.base_model.model.q_proj
    from test_loran_peft import X

    x = X.cuda()
    with torch.no_grad():
        y = model(x)
        before = layer.base_layer.weight.detach().clone()
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)


def test_per_rank_device_map(monkeypatch):
    from loran.pipeline.base_models import default_device_map

    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    assert default_device_map() == {"": last}
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device_map() == {"": 0}
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    from accelerate import dispatch_model

    model = dispatch_model(copy.deepcopy(model), device_map={"": last})
    assert {p.device for p in model.parameters()} == {torch.device("cuda", last)}
