"""The fast LoRAN path (folded into W0, row-chunked, optionally compiled) against the autograd reference."""
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loran.autograd as la
from loran.bench import adapter as bench_adapter
from loran.bench import cost
from loran.bench import dropout_sparse as bench_dropout_sparse
from loran.bench import train_step as bench_train
from loran import ACTIVATIONS, Activation, LoranConfig, get_loran_model, loran_layers
from loran.autograd import Adapter, DenseWeight, loran_linear, loran_update, reference_update
from loran.variants import Path as LayerPath, choose_path

# Parameters where each f is clearly non-linear on |z| ~ 0.1-1 (as test_loran_math).
PARAMS = {"sinter": {"amp": 0.5, "omega": 30.0}, "swish": {"beta": 3.0}, "cos": {"omega": 20.0}}
TOL = dict(rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# The element-wise functions the fast path uses are Activation.f and Activation.df.


def test_equal_activations_share_their_pointwise_functions():
    """The fused kernels are compiled per function object: equal activations must hand over the same ones."""
    one, two = Activation("sinter", {"amp": 0.1, "omega": 3.0}), Activation("sinter", {"omega": 3.0, "amp": 0.1})
    assert one.pointwise is two.pointwise
    assert Activation("sigmoid", start="base").pointwise is not Activation("sigmoid", start="official").pointwise
    assert Activation("sigmoid", start="base").offset == 0.5 and Activation("sigmoid", start="official").offset == 0


# ---------------------------------------------------------------------------------------------------------------
# loran_linear / loran_update against plain autograd, several blocks and chunks, several adapters.


def _adapters(d_out, d_in, ranks, dtype, seed=0, names=("sinter", "tanh")):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        name = names[i % len(names)]
        A = (torch.randn(r, d_in, generator=gen, dtype=dtype) * 0.5).requires_grad_()
        B = (torch.randn(d_out, r, generator=gen, dtype=dtype) * 0.5).requires_grad_()
        out.append(Adapter(A, B, 1.5 + i, Activation(name, PARAMS.get(name, {}))))
    return out


def _dense_reference(x, W, bias, adapters):
    y = x @ W.T + (0 if bias is None else bias)
    return y + sum(reference_update(x, a.A, a.B, a.scaling, a.act).to(x.dtype) for a in adapters)


@pytest.mark.parametrize("d_out,d_in", [(13, 13), (13, 7), (5, 11)])
@pytest.mark.parametrize("n_adapters", [1, 2])
@pytest.mark.parametrize("fresh", [False, True])
def test_folded_layer_equals_reference(eager, d_out, d_in, n_adapters, fresh):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(d_out, d_in, generator=gen)
    bias = torch.randn(d_out, generator=gen)
    grads = []
    for fast in (True, False):
        adapters = _adapters(d_out, d_in, [3, 2][:n_adapters], torch.float32)
        x = torch.randn(2, 4, d_in, generator=torch.Generator().manual_seed(2)).requires_grad_()
        if fast:  # 2-row chunks, 4-row blocks: every loop runs several times, with a ragged end
            weight_fn = lambda dt: DenseWeight(W.clone() if fresh else W, fresh)  # noqa: E731
            y = loran_linear(x, weight_fn, bias, adapters, chunk_rows=2, block_rows=4)
        else:
            y = _dense_reference(x, W, bias, adapters)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        grads.append([y.detach(), x.grad] + [t.grad for a in adapters for t in (a.A, a.B)])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, **TOL)


def test_folded_layer_gradcheck_float64(eager):
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    adapters = _adapters(7, 6, [3, 2], torch.float64)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, bias, A0, B0, A1, B1):
        ads = [a._replace(A=A, B=B) for a, (A, B) in zip(adapters, [(A0, B0), (A1, B1)])]
        return loran_linear(x, lambda dt: DenseWeight(W, False), bias, ads, chunk_rows=2, block_rows=4)

    inputs = (x, bias, *(t for a in adapters for t in (a.A, a.B)))
    assert torch.autograd.gradcheck(fn, inputs)


def test_update_with_result_gradcheck_float64(eager):
    act = Activation("sinter", PARAMS["sinter"])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    result = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    B = (torch.randn(7, 3, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, result, A, B: loran_update(x, A, B, 1.5, act, chunk_rows=2, block_rows=4, result=result),
        (x, result, A, B))


def test_update_returns_result_dtype_under_autocast(eager):
    act = Activation("sinter", PARAMS["sinter"])
    x = torch.randn(4, 6)
    A, B = torch.randn(3, 6) * 0.5, torch.randn(5, 3) * 0.5
    result = torch.randn(4, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = loran_update(x, A, B, 2.0, act, result=result)
    assert y.dtype == torch.bfloat16
    expected = result + reference_update(x, A, B, 2.0, act).bfloat16()
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------------------------------------------------------
# Inside PEFT: the fast path (default) against memory_efficient=False, which is PEFT's path + plain autograd.


class Block(nn.Module):
    """A square (12 -> 12) and a non-square (12 -> 5) projection, and a GPT-2 style Conv1D (12 -> 9)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 12)
        self.v_proj = nn.Linear(12, 5, bias=False)
        self.c_attn = Conv1D(9, 12)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.v_proj(x), self.c_attn(x)], dim=-1)


def _block_model(memory_efficient: bool, dropout: float, two_adapters: bool, conv: bool = False):
    """LoRAN on q_proj and v_proj, or (conv) on the Conv1D c_attn, with B drawn so that f is clearly non-linear."""
    torch.manual_seed(0)
    targets = dict(target_modules=["c_attn"], fan_in_fan_out=True) if conv else dict(target_modules=["q_proj",
                                                                                                      "v_proj"])
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=dropout, memory_efficient=memory_efficient, **targets)
    model = get_loran_model(Block(), LoranConfig(**kwargs, activation="sinter", activation_kwargs=PARAMS["sinter"]))
    if two_adapters:
        model.add_adapter("other", LoranConfig(**{**kwargs, "r": 2}, activation="tanh"))
        model.base_model.set_adapter(["default", "other"])
    gen = torch.Generator().manual_seed(1)
    for _, layer in loran_layers(model):
        for lin in layer.lora_B.values():
            lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * 0.5
    return model.train()


def _folded(model, x) -> list[bool]:
    return [choose_path(layer, x).path is LayerPath.FOLDED for _, layer in loran_layers(model)]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("two_adapters", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_peft_fast_path_equals_reference(eager, dropout, two_adapters, conv):
    x = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(7))
    results = []
    for memory_efficient in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: "Setting fan_in_fan_out=True" for Conv1D
            model = _block_model(memory_efficient, dropout, two_adapters, conv)
        xi = x.clone().requires_grad_()
        n_layers = 1 if conv else 2
        assert _folded(model, xi) == [memory_efficient and dropout == 0] * n_layers
        torch.manual_seed(11)  # the same dropout masks on both paths
        y = model(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(8)))
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == n_layers * 2 * (2 if two_adapters else 1)
        results.append((y.detach(), xi.grad, grads))
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)


def test_eval_mode_folds_despite_dropout_and_matches(eager):
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(9))
    fast, ref = _block_model(True, 0.3, False).eval(), _block_model(False, 0.3, False).eval()
    assert all(_folded(fast, x))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **TOL)


def test_disabled_merged_and_mixed_batch_keep_peft_semantics(eager):
    model = _block_model(True, 0.0, False)
    model.add_adapter("other", LoranConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], activation="tanh"))
    gen = torch.Generator().manual_seed(2)
    for _, layer in loran_layers(model):   # B = 0 would make "other" the base model: the batch could not tell them apart
        layer.lora_B["other"].weight.data = torch.randn(layer.lora_B["other"].weight.shape, generator=gen) * 0.5
    model.eval()  # PEFT refuses adapter_names in training mode
    x = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert all(_folded(model, x))
        y_default = model(x)
        with model.disable_adapter():
            y_base = model(x)
            assert not any(_folded(model, x))
        model.set_adapter("other")
        y_other = model(x)
        assert (y_other - y_base).abs().max() > 1e-2 and (y_other - y_default).abs().max() > 1e-2
        model.set_adapter("default")
        mixed = model(x, adapter_names=["default", "other", "__base__", "default"])
        torch.testing.assert_close(mixed, torch.stack([y_default[0], y_other[1], y_base[2], y_default[3]]), **TOL)
        model.merge_adapter()
        assert not any(_folded(model, x))
        torch.testing.assert_close(model(x), y_default, rtol=1e-5, atol=1e-5)


def test_linear_activation_keeps_peft_lora_path(eager):
    model = get_loran_model(Block(), LoranConfig(r=4, target_modules=["q_proj"], activation="identity"))
    assert not any(_folded(model, torch.randn(2, 12)))


def test_nf4_base_folds_and_matches_reference(eager):
    from test_loran_peft import X, make_toy, randomise_B

    results = []
    for memory_efficient in (True, False):
        model = get_loran_model(make_toy("nf4"), LoranConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             memory_efficient=memory_efficient, activation="sinter",
                                                             activation_kwargs=PARAMS["sinter"]))
        randomise_B(model)
        x = X.clone().requires_grad_()
        assert all(_folded(model, x)) == memory_efficient
        y = model(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for n, p in model.named_parameters() if p.requires_grad])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_int8_base_is_not_folded(eager):
    from test_loran_peft import make_toy

    model = get_loran_model(make_toy("int8"), LoranConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not any(_folded(model, torch.randn(2, 16)))


def test_fast_path_keeps_no_dout_by_din_tensor(eager):
    """Autograd keeps x (and nothing else that is not a parameter) for a folded LoRAN layer."""
    model = _block_model(True, 0.0, False)
    layer = model.base_model.model.q_proj
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept.append(t.numel())
        return t

    x = torch.randn(6, 12, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert kept == [6 * 12]


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernels (slow: torch.compile takes seconds to minutes on the first call).


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [[4], [4, 2]])
def test_compiled_kernels_equal_eager(monkeypatch, ranks):
    d_out, d_in = 40, 24
    gen = torch.Generator().manual_seed(12)
    W = torch.randn(d_out, d_in, generator=gen)
    runs = []
    for mode in ("always", "never"):
        monkeypatch.setattr(la, "COMPILE", mode)
        adapters = _adapters(d_out, d_in, ranks, torch.float32)
        x = torch.randn(9, d_in, generator=torch.Generator().manual_seed(13)).requires_grad_()
        y = loran_linear(x, lambda dt: DenseWeight(W, False), None, adapters, chunk_rows=8, block_rows=16)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(14)))
        runs.append([y.detach(), x.grad] + [t.grad for a in adapters for t in (a.A, a.B)])
    assert not la.KERNELS.failed
    for got, ref in zip(*runs):
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_peft_layers_equal_reference(monkeypatch, dropout):
    monkeypatch.setattr(la, "COMPILE", "always")
    x = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(7))
    results = []
    for memory_efficient in (True, False):
        model = _block_model(memory_efficient, dropout, two_adapters=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        y = model(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(8)))
        trained = [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
        results.append([y.detach(), xi.grad] + trained)
    assert not la.KERNELS.failed
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark scripts run (tiny sizes), so that they cannot rot.


def test_bench_adapter_runs(eager, capsys):
    bench = bench_adapter
    rows = bench.main(["--sizes", "48", "--ranks", "4", "--tokens", "16", "--dropouts", "0,0.1", "--warmup", "0",
                       "--repeats", "2", "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    assert "| 48 | 4 | 16 | 0 | loran |" in out and "torch_threads=" in out
    by = {(r.dropout, r.method): r for r in rows}
    assert set(by) == {(p, m) for p in (0.0, 0.1) for m in bench.METHODS}
    for p in (0.0, 0.1):
        assert by[(p, "loran")].saved_max_numel < 48 * 48 <= by[(p, "loran_naive")].saved_max_numel
        assert all(by[(p, m)].ms > 0 and by[(p, m)].peak_mib > 0 for m in bench.METHODS)
        # the path that ran, as choose_path reports it, and that path's multiply-adds and floor
        assert all(by[(p, m)].path == bench.method_path(m, p) and by[(p, m)].floor_ms > 0 for m in bench.METHODS)
        assert all(by[(p, m)].macs == bench.multiply_adds(m, 48, 4, 16, p) for m in bench.METHODS)


def test_bench_adapter_multiply_adds():
    """The issue's cost model at d = 2048, r = 64, N = 512: (3 N + 4 r) / (2 N + 6 N r / d) = 1792 / 1120 folded,
    (5 N + 4 r + 6 N r / d) / 1120 with dropout (the residual split), (5 N + 3 r) / 1120 for the official-style
    materialisation; the dense path (the official start of a non-centred f) 5 N + 4 r."""
    macs = bench_adapter.multiply_adds
    ratio = lambda m, p: macs(m, 2048, 64, 512, p) / macs("lora", 2048, 64, 512, p)  # noqa: E731
    assert ratio("loran", 0.0) == pytest.approx(1792 / 1120)
    assert ratio("loran", 0.05) == pytest.approx(2912 / 1120)
    assert ratio("loran_naive", 0.0) == ratio("loran_naive", 0.05) == pytest.approx(2752 / 1120)
    assert sum(cost.path_multiply_adds("dense", 2048, 2048, 64, 512).values()) / 2048**2 == 5 * 512 + 4 * 64
    assert cost.path_multiply_adds("residual", 2048, 2048, 64, 512, slope=0.0)["lowrank"] == 0


@pytest.mark.parametrize("policy", ["float32", "autocast"])
def test_benchmarks_record_the_path_choose_path_takes_under_autocast(policy):
    """Under bf16 autocast a Sinter layer never folds: the recorded path is the residual split, its update in bf16 only
    under the autocast policy, Z always fp32; its floor at a GPU's rates is positive and below the fp32 one's."""
    model = get_loran_model(nn.Sequential(nn.Linear(32, 24)), LoranConfig(r=4, target_modules=["0"],
                                                                          update_dtype=policy))
    x = torch.randn(8, 32)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()

    (run,) = cost.record_paths(model, step).values()
    assert (run.path, run.update_low, run.base_low, run.d_in, run.d_out, run.r, run.tokens) == (
        "residual", policy == "autocast", True, 32, 24, 4, 8)
    assert cost.part_dtypes(run)["z"] == "fp32"
    assert 0 < cost.floor_seconds([run], cost.RATES["H100"]) <= cost.floor_seconds([run._replace(update_low=False)],
                                                                                   cost.RATES["H100"])


def test_bench_adapter_quick_flag_parses():
    args = bench_adapter.parse_args(["--quick"])
    assert args.sizes == [256] and args.repeats == 2


def test_bench_train_runs_on_the_tiny_model(eager, capsys):
    train = bench_train
    rows, gen = train.main(["--model", "tiny", "--bases", "none", "--dropouts", "0,0.1", "--warmup", "0",
                            "--steps", "1", "--batch", "2", "--seq", "8", "--new-tokens", "2", "--gen-repeats", "1",
                            "--gen-batch", "1", "--prompt-len", "4"])
    assert [(r["dropout"], r["method"]) for r in rows] == [(p, m) for p in (0.0, 0.1) for m in ("LoRA", "LoRAN")]
    assert [r["path"] for r in rows] == ["lora", "folded", "lora", "residual"]
    assert all(r["step_s"] > 0 and r["total_mib"] > r["resident_mib"] > 0 for r in rows)
    assert [g["method"] for g in gen] == ["base", "lora", "loran"]
    out = capsys.readouterr().out
    assert "| merged model | tokens/s (median) |" in out and "# merged models: the same module types" in out
    # The multiply-add count: the adapted model counts each linear layer once (not also its base_layer or A, B),
    # LoRAN's extra is (N + 4 r) d_in d_out per adapted layer without dropout and (3 N + 4 r) d_in d_out with it.
    bare, _ = train.load("none", "tiny")
    tokens, seq, r = 2 * 8, 8, 8
    adapted = sum(m.in_features * m.out_features for n, m in bare.named_modules() if n.split(".")[-1] in train.TARGETS)
    plain = train.multiply_adds(bare, tokens, seq, r, 0.0)
    for p in (0.0, 0.1):
        wrapped = train.adapt(bare, "loran", r, 16, p)
        macs = train.multiply_adds(wrapped, tokens, seq, r, p)
        assert macs["base"] == plain["base"] > 0
        lowrank = 3 * tokens * r * sum(m.in_features + m.out_features for n, m in bare.named_modules()
                                       if n.split(".")[-1] in train.TARGETS)
        assert macs["loran"] - macs["base"] == ((3 if p else 1) * tokens + 4 * r) * adapted + (lowrank if p else 0)
        bare = wrapped.unload()
    layout = train._layout(bare)
    bare.lm_head.weight.data = bare.lm_head.weight.data.T.contiguous().T  # same values, other strides
    assert train._layout(bare) != layout
    by = {(row["dropout"], row["method"]): row["gmacs"] for row in rows}
    assert by[(0.1, "LoRAN")] > by[(0.0, "LoRAN")] > by[(0.0, "LoRA")] == by[(0.1, "LoRA")]


def test_bench_dropout_sparse_runs_and_its_identity_holds(capsys):
    """The exact rewrite of the dropout layer that results/bench.md times holds to float64 roundoff, and the sparse
    kernels it times agree with the dense products."""
    sparse = bench_dropout_sparse
    rows = sparse.main(["--sizes", "40", "--tokens", "24", "--dropouts", "0.2", "--repeats", "1"])
    assert "| 40 | 24 | 0.2 |" in capsys.readouterr().out
    assert rows[0]["identity_rel_err"] < 1e-12 and rows[0]["max_err"] < 1e-4
    assert 0.05 < rows[0]["nnz_share"] < 0.4


def test_nf4_fold_dequantises_like_bitsandbytes(eager):
    """A 4-bit weight quantised from bf16, computing in fp32: with B = 0 the folded layer is the base layer."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.bfloat16(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantises
    q.support_avx512bf16_for_cpu = False

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = q

        def forward(self, x):
            return self.q_proj(x)

    base = One()
    base.is_loaded_in_4bit = True
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = base(x)
    model = get_loran_model(base, LoranConfig(r=4, target_modules=["q_proj"]))
    assert q.weight.quant_state.dtype == torch.bfloat16 and all(_folded(model, x))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
