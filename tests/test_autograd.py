"""loran/autograd.py: the memory-saving update and layer functions (loran_update, loran_linear), the reference, the
low-rank and delta-weight helpers, the row chunks and blocks, and the element-wise kernels (eager, fused, and the
torch.compile dispatch) against plain autograd and independent formulas."""
import pytest
import torch

import loran.autograd as la

from test_residual_split import relative
from test_variants import SINTER


# The fused kernels' Python (what torch.compile traces), run eagerly against the eager kernels: every flag.
# (Mutation testing cannot reach them through torch.compile; test_compiled_kernels runs them compiled.)
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_fused_kernels_equal_the_eager_kernels(base, accumulate, write, separate):
    from loran.activations import Activation

    pw = Activation("sinter", SINTER).pointwise
    gen = torch.Generator().manual_seed(21)
    B, A = torch.randn(5, 2, generator=gen), torch.randn(2, 4, generator=gen)
    W0 = torch.randn(5, 4, generator=gen) if base else None
    start, G0 = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    outs = []
    for weight_kernel, grad_kernel in ((la._weight_kernel, la._grad_kernel),
                                       (la._fused_weight_kernel, la._fused_grad_kernel)):
        out_w = start.clone()
        weight_kernel(out_w, B, A, W0, 2.5, pw.f, accumulate)
        out_g, G = start.clone(), G0.clone()
        grad_z = torch.zeros(5, 4) if separate else None
        grad_kernel(out_g if write else None, grad_z, G, B, A, W0, 2.5, pw.f, pw.df, accumulate)
        outs.append([out_w, out_g, G, grad_z if separate else G])
    for got, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # and against the formulas
    z = B @ A
    expected_w = (start if accumulate else (W0 if base else 0)) + 2.5 * pw.f(z)
    torch.testing.assert_close(outs[1][0], expected_w)
    torch.testing.assert_close(outs[1][3], G0 * 2.5 * pw.df(z))
    torch.testing.assert_close(outs[1][1], expected_w if write else start)


# The memory-saving backward: partly frozen adapters, and a low-precision result.
@pytest.mark.parametrize("trainable", [("A", "B"), ("B", "A"), ("AB", ""), ("", "AB"), ("A", ""), ("", "")])
def test_backward_with_partly_frozen_adapters(eager, trainable):
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear, reference_update

    gen = torch.Generator().manual_seed(31)
    W = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    acts = [Activation("sinter", SINTER), Activation("tanh")]
    raw = [(torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.5,
            torch.randn(6, 3, generator=gen, dtype=torch.float64) * 0.5) for _ in range(2)]
    x0 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    runs = []
    for fast in (True, False):
        ads = [Adapter(A.clone().requires_grad_("A" in t), B.clone().requires_grad_("B" in t), 1.5 + i, act)
               for i, ((A, B), act, t) in enumerate(zip(raw, acts, trainable))]
        x = x0.clone().requires_grad_()
        if fast:
            y = loran_linear(x, lambda dt: DenseWeight(W, False), None, ads, chunk_rows=2, block_rows=4)
        else:
            y = x @ W.T + sum(reference_update(x, a.A, a.B, a.scaling, a.act) for a in ads)
        y.backward(g)
        runs.append([x.grad] + [t.grad for a in ads for t in (a.A, a.B)])
    for got, ref in zip(*runs):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref)


def test_update_backward_with_a_bf16_result(eager):
    from loran.activations import Activation
    from loran.autograd import loran_update, reference_update

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(32)
    x0, A0, B0 = torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen) * 0.5, torch.randn(5, 3, generator=gen) * 0.5
    result = torch.randn(4, 5, generator=gen).bfloat16()
    g = torch.randn(4, 5, generator=gen).bfloat16()
    grads = []
    for fast in (True, False):
        x, A, B = x0.clone().requires_grad_(), A0.clone().requires_grad_(), B0.clone().requires_grad_()
        r = result.clone().requires_grad_()
        y = loran_update(x, A, B, 2.0, act, result=r) if fast else r + reference_update(x, A, B, 2.0, act).bfloat16()
        assert y.dtype == torch.bfloat16
        y.backward(g)
        grads.append([x.grad, A.grad, B.grad, r.grad])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_reference_update_in_a_given_dtype(dtype):
    """Mutants: reference_update's `dtype is None` test inverted, `/ scaling`, and x, A, B, act or dtype not passed on
    in its dtype branch (the path of update_dtype=autocast with memory_efficient=False). Independent reference: the
    same products written out in that dtype (dtype None: float32, compared with float64)."""
    from loran.activations import Activation

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(41)
    x, A, B = torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen) * 0.5, torch.randn(5, 3, generator=gen)
    y = la.reference_update(x, A, B, 2.5, act, dtype=dtype)
    z = (B.double() @ A.double())
    exact = 2.5 * x.double() @ (z + 0.5 * z * torch.sin(30 * z)).T
    if dtype is None:
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        assert y.dtype == dtype
        zd = B.to(dtype) @ A.to(dtype)
        assert torch.equal(y, (x.to(dtype) @ (zd + 0.5 * zd * torch.sin(30 * zd)).T) * 2.5)
        torch.testing.assert_close(y.double(), exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_delta_weight_dtype(dtype):
    """Mutants: _up never widening (`or True`: bf16 factors stay bf16), delta_weight's `dtype is None` test inverted,
    and B, A or B A not passed on in its dtype branch. Reference: f(B A) written out in float32 / bf16 / float64
    (bf16 factors, except float32 ones for float64, so that every cast matters)."""
    from loran.activations import Activation

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(43)
    low = torch.float32 if dtype == torch.float64 else torch.bfloat16
    A, B = (torch.randn(3, 6, generator=gen) * 0.5).to(low), torch.randn(5, 3, generator=gen).to(low)
    x = torch.randn(4, 6, generator=gen).to(low)  # reference_update casts x as well
    got = la.delta_weight(A, B, act, dtype)
    wide = torch.float32 if dtype is None else dtype
    z = B.to(wide) @ A.to(wide)
    assert got.dtype == wide
    assert torch.equal(got, z + 0.5 * z * torch.sin(30 * z))
    y = la.reference_update(x, A, B, 2.0, act, dtype)
    assert torch.equal(y, (x.to(wide) @ got.T) * 2.0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("needs", ["xAB", "x", "A", "B", "AB"])
def test_lowrank_update_values_and_gradients(x_dtype, dtype, needs):
    """lowrank_update = s (x A^T) B^T in `dtype`, autograd keeping x in its own dtype: output and every gradient
    against plain autograd on copies widened to `dtype` (s = 2.5, so a dropped or inverted s shows; leading dims
    (2, 3) and r < d_in, d_out, so a wrong reshape or transpose does too)."""
    gen = torch.Generator().manual_seed(44)
    x0 = torch.randn(2, 3, 6, generator=gen).to(x_dtype)
    A0, B0 = torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen)
    g = torch.randn(2, 3, 5, generator=gen, dtype=dtype)
    x, A, B = (t.clone().requires_grad_(n in needs) for t, n in ((x0, "x"), (A0, "A"), (B0, "B")))
    y = la.lowrank_update(x, A, B, 2.5, dtype)
    assert y.dtype == dtype and y.shape == (2, 3, 5)
    rx, rA, rB = (t.to(dtype).requires_grad_(n in needs) for t, n in ((x0, "x"), (A0, "A"), (B0, "B")))
    ref = ((rx @ rA.T) @ rB.T) * 2.5
    torch.testing.assert_close(y, ref)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for got, want, like in ((x.grad, rx.grad, x0), (A.grad, rA.grad, A0), (B.grad, rB.grad, B0)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == like.dtype and got.shape == like.shape
            torch.testing.assert_close(got, want.to(like.dtype))


class _MatmulShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output shape of every mm / addmm / addmm_ (under a dispatch mode the kernels run eagerly)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("sizes, chunk, block", [((1, 2), 1, 2), ((3, 2), 3, 3), ((None, None), 2, 4)])
def test_update_works_in_the_row_chunks_and_blocks_it_is_given(monkeypatch, sizes, chunk, block):
    """The memory bound: W (6 x 5) is formed `chunk` rows at a time (B[rows] A: (chunk, 5)) and used `block` rows
    at a time (x W[block]^T: (4, block)); block_rows is at least chunk_rows; the defaults come from CHUNK_ELEMENTS
    and BLOCK_ELEMENTS (patched to 10 and 20: 2 and 4 rows of d_in = 5). Mutants: chunk_rows / block_rows not passed
    on (loran_update, _LoranLinear), _sizes and _blocks. The values are checked against reference_update too."""
    from loran.activations import Activation

    monkeypatch.setattr(la, "CHUNK_ELEMENTS", 10)
    monkeypatch.setattr(la, "BLOCK_ELEMENTS", 20)
    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(45)
    x0, A0, B0 = torch.randn(4, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(6, 3, generator=gen)
    g = torch.randn(4, 6, generator=gen)
    x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
    with _MatmulShapes() as fwd:
        y = la.loran_update(x, A, B, 2.0, act, chunk_rows=sizes[0], block_rows=sizes[1])
    with _MatmulShapes() as bwd:
        y.backward(g)
    blocks = [range(i, min(i + block, 6)) for i in range(0, 6, block)]
    chunks = [[min(chunk, len(b) - j) for j in range(0, len(b), chunk)] for b in blocks]
    assert fwd.shapes == [s for b, c in zip(blocks, chunks) for s in [(n, 5) for n in c] + [(4, len(b))]]
    expected_bwd = []
    for i, (b, c) in enumerate(zip(blocks, chunks)):  # G, Z per chunk, dL/dx (+)=, dL/dB[block], dL/dA +=
        expected_bwd += [(len(b), 5)] + [(n, 5) for n in c] + [(4, 5), (len(b), 3), (3, 5)]
    assert bwd.shapes == expected_bwd, (bwd.shapes, expected_bwd)
    rx, rA, rB = (t.clone().requires_grad_() for t in (x0, A0, B0))
    ref = la.reference_update(rx, rA, rB, 2.0, act)
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    for got, want in ((x.grad, rx.grad), (A.grad, rA.grad), (B.grad, rB.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("with_base", [True, False])
def test_every_buffer_lives_on_the_input_device(monkeypatch, with_base):
    """On the meta device (which needs no GPU), forward and backward with several row blocks: a buffer allocated
    without device=x.device lands on the CPU and the meta ops refuse it. Mutants: `device=x.device` dropped from
    the torch.empty of W blocks (forward, backward) or of the output. Autocast cannot be set for meta: switched off."""
    import contextlib

    from loran.activations import Activation

    monkeypatch.setattr(la, "_no_autocast", lambda device_type: contextlib.nullcontext())
    act = Activation("sinter", SINTER)
    x, A, B = (torch.empty(*shape, device="meta", requires_grad=True) for shape in ((4, 5), (3, 5), (6, 3)))
    W = torch.empty(6, 5, device="meta")
    weight_fn = (lambda dt: la.DenseWeight(W, False)) if with_base else None
    y = la.loran_linear(x, weight_fn, None, [la.Adapter(A, B, 2.0, act)], chunk_rows=1, block_rows=2)
    assert y.device.type == "meta" and y.shape == (4, 6)
    y.backward(torch.empty(4, 6, device="meta"))
    assert all(t.grad.device.type == "meta" and t.grad.shape == t.shape for t in (x, A, B))


def test_three_adapters_forward_and_backward(eager):
    """loran_linear with three adapters (sinter, tanh, identity) on a base weight with a bias: output and every
    gradient against plain autograd. Mutant: the adapters' A walked with step 3 (`ab[0::3]`, as many as with 1 or 2
    adapters, one pair short with 3)."""
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear, reference_update

    gen = torch.Generator().manual_seed(46)
    W, b = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    acts = [Activation("sinter", SINTER), Activation("tanh"), Activation("identity")]
    raw = [(torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64))
           for _ in acts]
    x0, g = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    runs = []
    for fast in (True, False):
        ads = [Adapter(A.clone().requires_grad_(), B.clone().requires_grad_(), 0.5 + i, act)
               for i, ((A, B), act) in enumerate(zip(raw, acts))]
        x = x0.clone().requires_grad_()
        if fast:
            y = loran_linear(x, lambda dt: DenseWeight(W, False), b, ads)
        else:
            y = x @ W.T + b + sum(reference_update(x, a.A, a.B, a.scaling, a.act) for a in ads)
        y.backward(g)
        runs.append([y.detach(), x.grad] + [t.grad for a in ads for t in (a.A, a.B)])
    for got, ref in zip(*runs):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("compiled", [False, True])
def test_default_sizes_of_the_compiled_and_the_eager_kernels(compiled):
    """_sizes' defaults (module docstring): eager chunks of CHUNK_ELEMENTS (2**16) elements, a fused kernel takes
    COMPILED_CHUNK_ELEMENTS (2**22), blocks of BLOCK_ELEMENTS (2**22), a block never below a chunk. Mutant: the
    compiled chunk size never chosen (`compiled and False`), which the matmul-shape test cannot see (no compile
    under a dispatch mode)."""
    d_in = 1000
    chunk = (2**22 if compiled else 2**16) // d_in
    assert la._sizes((None, None), d_in, compiled) == (chunk, 2**22 // d_in)
    assert la._sizes((7, None), d_in, compiled) == (7, 2**22 // d_in)
    assert la._sizes((None, 3), d_in, compiled) == (chunk, chunk)


@pytest.mark.parametrize("with_result", [False, True])
@pytest.mark.parametrize("dt, bias_dt", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_result_and_a_bias_of_another_dtype_are_both_added(eager, with_result, dt, bias_dt):
    """loran_linear(result=r, bias=b) = r + x (W0 + s f(B A))^T + b, with b in another dtype than x, W0, A, B and r
    (the bias is cast to the compute dtype). Mutants: the bias replacing the result (`acc is None or True`),
    subtracted, or not cast (with or without a result)."""
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear

    act = Activation("sinter", SINTER)
    gen = torch.Generator().manual_seed(47)
    x, W = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    A, B = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    b, r = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    z = B @ A
    expected = x @ (W + 1.5 * (z + 0.5 * z * torch.sin(30 * z))).T + b + (r if with_result else 0)
    y = loran_linear(x.to(dt), lambda d: DenseWeight(W.to(d), False), b.to(bias_dt), [Adapter(A.to(dt), B.to(dt), 1.5, act)],
                     result=r.to(dt) if with_result else None)
    assert y.dtype == dt
    torch.testing.assert_close(y, expected.to(dt), rtol=1e-5, atol=1e-5)


def test_loran_linear_without_adapters_is_refused_with_its_message():
    """Mutants: the message of loran_linear's refusal replaced or re-cased."""
    with pytest.raises(ValueError) as err:
        la.loran_linear(torch.zeros(2, 3), None, None, [])
    assert str(err.value) == "loran_linear needs at least one adapter"


def test_loran_linear_output_dtype(eager):
    """Docstring of loran_linear: the output has x's dtype when W0 is given, result's when result is given (bf16 x,
    float32 compute). Mutants: the final cast dropped, made unconditional or inverted."""
    from loran.activations import Activation
    from loran.autograd import Adapter, DenseWeight, loran_linear

    gen = torch.Generator().manual_seed(48)
    x, W = torch.randn(4, 5, generator=gen).bfloat16(), torch.randn(6, 5, generator=gen)
    A, B, r = torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen), torch.randn(4, 6, generator=gen)
    ads = [Adapter(A, B, 1.5, Activation("sinter", SINTER))]
    y = loran_linear(x, lambda dt: DenseWeight(W, False), None, ads)
    z = B @ A
    full = x.float() @ (W + 1.5 * (z + 0.5 * z * torch.sin(30 * z))).T
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, full.bfloat16())
    y = loran_linear(x, lambda dt: DenseWeight(W, False), None, ads, result=r)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, r + full)


def test_kernel_dispatch_with_a_stand_in_compiler(monkeypatch, caplog, request):
    """The torch.compile machinery (_Kernels) with torch.compile replaced by a recorder, so that it runs in
    milliseconds (under mutmut a real compile fails after minutes, and tests/test_compiled_kernels.py checks a real
    one): which modes and sizes compile, the options and kernels given to torch.compile, compiled once, kernel 0 for
    the weight and 1 for the gradient, eager kernels when not compiling, and a failed compile: one warning with the
    error's type and first line, eager from then on. Mutants of use_compiled, _get, _call, weight and grad."""
    import functools
    import logging

    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    def fake_compile(fn=None, **opts):
        calls.append((fn, opts))
        return lambda *args: calls.append(("compiled", fn, args))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(la, "_weight_kernel", lambda *args: calls.append(("eager weight", args)))
    monkeypatch.setattr(la, "_grad_kernel", lambda *args: calls.append(("eager grad", args)))
    dynamo = torch._dynamo.config  # a config module: monkeypatch's undo would delete the setting, so restore by hand
    request.addfinalizer(functools.partial(setattr, dynamo, "recompile_limit", dynamo.recompile_limit))
    dynamo.recompile_limit = 8

    K = la._Kernels()
    assert K.compiled is None and K.failed is False
    # Which calls compile.
    n = la.COMPILE_MIN_ELEMENTS
    for mode in ("never", "0", "false", "off", "NEVER", "Off"):
        monkeypatch.setattr(la, "COMPILE", mode)
        assert not K.use_compiled(10 * n), mode
    for mode in ("always", "1", "true", "on", "ALWAYS", "On"):
        monkeypatch.setattr(la, "COMPILE", mode)
        assert K.use_compiled(1), mode
    monkeypatch.setattr(la, "COMPILE", "auto")
    assert not K.use_compiled(n - 1) and K.use_compiled(n) and K.use_compiled(n + 1)

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(la, "COMPILE", "always")
    with Passthrough():
        assert not K.use_compiled(n)
    assert not calls  # deciding compiles nothing
    # The weight and the gradient kernels: compiled once, with their options, each called with its own args.
    K.weight(True, "w1")
    assert calls[:2] == [(la._fused_weight_kernel, dict(dynamic=True, fullgraph=True)),
                         (la._fused_grad_kernel, dict(dynamic=True, fullgraph=True))]
    assert calls[2:] == [("compiled", la._fused_weight_kernel, ("w1",))]
    assert dynamo.recompile_limit == la._Kernels.RECOMPILE_LIMIT == 64
    del calls[:]
    K.grad(True, "g1", "g2")
    K.weight(True, "w2")
    K.weight(False, "w3")
    K.grad(False, "g3")
    assert calls == [("compiled", la._fused_grad_kernel, ("g1", "g2")), ("compiled", la._fused_weight_kernel, ("w2",)),
                     ("eager weight", ("w3",)), ("eager grad", ("g3",))]
    assert K.failed is False
    # A raised limit is kept.
    dynamo.recompile_limit = 100
    la._Kernels()._get()
    assert dynamo.recompile_limit == 100

    # A compile that fails: one warning (type, first line of the message), the eager kernel, eager from then on.
    for message, shown in (("no C++ compiler\nsecond line", "RuntimeError: no C++ compiler"), ("", "RuntimeError: ")):
        K = la._Kernels()
        attempts = []

        def broken(*args):
            attempts.append(args)
            raise RuntimeError(message)

        K.compiled = (broken, broken)
        del calls[:]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loran.autograd"):
            K.weight(True, "w1")
            K.grad(True, "g1")
            K.weight(True, "w2")
        assert attempts == [("w1",)] and K.failed is True
        assert calls == [("eager weight", ("w1",)), ("eager grad", ("g1",)), ("eager weight", ("w2",))]
        assert [r.getMessage() for r in caplog.records] == [
            f"LoRAN: torch.compile of the element-wise work failed ({shown}); using eager ops"]
        assert not K.use_compiled(10 * n)


def test_chunk_rows_for_is_the_most_rows_within_the_element_budget():
    """chunk_rows_for(d_in, elements): the most rows of a d_in-wide matrix that fit in `elements` elements, at least one
    (a row wider than the budget still makes a chunk of one). Mutants: the minimum of 2 rows, d_in counted as >= 2."""
    for d_in in (1, 2, 3, 7, 64, 1000):
        for elements in (1, 2, 5, 64, 999, 4096):
            rows = la.chunk_rows_for(d_in, elements)
            assert rows >= 1 and (rows == 1 or rows * d_in <= elements) and (rows + 1) * d_in > elements, \
                (d_in, elements, rows)
    assert la.chunk_rows_for(0, 8) == 8  # a zero-width matrix: as wide as one element


# residual_update (the RESIDUAL path's s x g(B A)^T; the path itself is tested in test_residual_split.py)
RELEASED = {"amp": 5e-5, "omega": 1e4}
NEEDS = [("x", "A", "B"), ("x",), ("A",), ("B",), ("A", "B")]


@pytest.mark.parametrize("needs", NEEDS, ids="+".join)
@pytest.mark.parametrize("activation, params", [("sinter", {"amp": 0.5, "omega": 30.0}), ("sigmoid", {}),
                                                ("relu", {})])
def test_residual_update_gradcheck_float64(activation, params, needs):
    """residual_update's backward (several row blocks) is the derivative of its forward, for every set of inputs
    that need a gradient (a frozen adapter under a trained input recomputes g(Z) for dL/dx alone)."""
    from loran.activations import Activation

    torch.manual_seed(0)
    act = Activation(activation, params)
    x, A, B = (torch.randn(*shape, dtype=torch.float64) * 0.5 for shape in ((2, 3, 6), (3, 6), (5, 3)))
    for name, t in zip("xAB", (x, A, B)):
        t.requires_grad_(name in needs)
    assert torch.autograd.gradcheck(lambda x, A, B: la.residual_update(x, A, B, 1.5, act, block_rows=2), (x, A, B))


@pytest.mark.parametrize("needs", NEEDS, ids="+".join)
def test_residual_update_in_float64_is_the_formula_to_float64_rounding(eager, needs):
    """Sinter's g(z) = amp z sin(omega z) written out here, in float64 autograd: residual_update with several row
    blocks and chunks equals it to 1e-12 (every buffer in float64 for float64 x, not float32)."""
    from loran.activations import Activation

    amp, omega = 0.5, 30.0
    gen = torch.Generator().manual_seed(5)
    x0, A0, B0 = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5 for shape in ((4, 6), (3, 6), (7, 3)))
    x, A, B = (t.clone().requires_grad_(name in needs) for name, t in zip("xAB", (x0, A0, B0)))
    rx, rA, rB = (t.clone().requires_grad_(name in needs) for name, t in zip("xAB", (x0, A0, B0)))
    grad_y = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    y = la.residual_update(x, A, B, 1.5, Activation("sinter", {"amp": amp, "omega": omega}), block_rows=2)
    Z = rB @ rA
    ref = 1.5 * rx @ (amp * Z * torch.sin(omega * Z)).T
    (y * grad_y).sum().backward()
    (ref * grad_y).sum().backward()
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in (("x", x.grad, rx.grad), ("A", A.grad, rA.grad), ("B", B.grad, rB.grad)):
        if name in needs:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert got is None


@pytest.mark.parametrize("needs", [("x", "A", "B"), ("x",)], ids="+".join)
def test_residual_update_with_bf16_inputs_computes_g_in_float32(eager, needs):
    """bf16 x, A and B (a model cast to bf16): Z and g(Z) in float32, the products in float32 (the default policy),
    output and gradients close to float64 math (to bf16 input rounding), several row blocks."""
    from loran.activations import Activation

    amp, omega = 0.5, 30.0
    gen = torch.Generator().manual_seed(6)
    x0, A0, B0 = (torch.randn(*shape, generator=gen).to(torch.bfloat16) * 0.5 for shape in ((4, 6), (3, 6), (7, 3)))
    x, A, B = (t.clone().requires_grad_(name in needs) for name, t in zip("xAB", (x0, A0, B0)))
    rx, rA, rB = (t.double().requires_grad_(name in needs) for name, t in zip("xAB", (x0, A0, B0)))
    y = la.residual_update(x, A, B, 1.5, Activation("sinter", {"amp": amp, "omega": omega}), block_rows=2)
    Z = rB @ rA
    ref = 1.5 * rx @ (amp * Z * torch.sin(omega * Z)).T
    y.float().pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert y.dtype == torch.float32 and relative(y, ref.detach()) < 1e-5
    for name, got, want in (("x", x.grad, rx.grad), ("A", A.grad, rA.grad), ("B", B.grad, rB.grad)):
        if name in needs:
            assert got.dtype == torch.bfloat16 and relative(got, want) < 1e-2
        else:
            assert got is None


def test_residual_update_buffers_live_on_the_input_device(monkeypatch):
    """On the meta device, forward and backward with several row blocks (as test_every_buffer_lives_on_the_input_
    device for the dense path): a buffer allocated without device=x.device lands on the CPU and is refused."""
    import contextlib

    from loran.activations import Activation

    monkeypatch.setattr(la, "_no_autocast", lambda device_type: contextlib.nullcontext())
    x, A, B = (torch.empty(*shape, device="meta", requires_grad=True) for shape in ((4, 5), (3, 5), (6, 3)))
    y = la.residual_update(x, A, B, 2.0, Activation("sinter", SINTER), block_rows=2)
    assert y.device.type == "meta" and y.shape == (4, 6)
    y.backward(torch.empty(4, 6, device="meta"))
    assert all(t.grad.device.type == "meta" and t.grad.shape == t.shape for t in (x, A, B))


def test_residual_update_keeps_only_x_a_b_for_backward():
    """Memory-efficient like DENSE: no d_out x d_in tensor (Z, g(Z)) lives between forward and backward."""
    from loran.activations import Activation

    act = Activation("sinter", RELEASED)
    x, A, B = torch.randn(4, 64), torch.randn(2, 64, requires_grad=True), torch.randn(48, 2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        la.residual_update(x, A, B, 2.0, act)
    assert max(saved) < 48 * 64


@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 1e-2)])
def test_residual_update_runs_on_the_dense_paths_kernels(monkeypatch, dtype, tol):
    """The g-part's element-wise work is DENSE's: fused (torch.compile) kernels in row blocks and chunks (block_rows)
    give the eager, one-block result, under both policies (float32 products; bf16 products of float32 g(Z))."""
    from loran.activations import Activation

    act = Activation("sinter", RELEASED)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(64, 512, generator=gen)
    A0, B0 = torch.randn(16, 512, generator=gen) * 0.02, torch.randn(512, 16, generator=gen) * 0.02
    outs = []
    monkeypatch.setattr(la, "KERNELS", la._Kernels())  # this test's own compile state: a failed compile is seen here
    for compile_mode, block_rows in (("never", None), ("always", 200)):
        monkeypatch.setattr(la, "COMPILE", compile_mode)
        x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
        y = la.residual_update(x, A, B, 2.0, act, dtype=dtype, block_rows=block_rows)
        y.float().pow(2).sum().backward()
        outs.append([y.float(), x.grad, A.grad, B.grad])
    assert la.KERNELS.compiled is not None and not la.KERNELS.failed   # compiled, not eager against eager
    for got, ref in zip(*outs):
        assert relative(got, ref.double()) <= tol


def test_residual_update_refuses_an_uncentred_activation_and_computes_in_the_dtype_given():
    from loran.activations import Activation

    x, A, B = torch.randn(2, 6), torch.randn(3, 6), torch.randn(5, 3)
    official = Activation("sigmoid", {}, start="official")  # f(0) = 0.5: no residual split
    with pytest.raises(ValueError, match=r"residual_update needs a centred activation \(f\(0\) = 0\); .* is not"):
        la.residual_update(x, A, B, 1.0, official)
    act = Activation("sinter", SINTER)
    assert la.residual_update(x, A, B, 1.0, act).dtype == torch.float32
    assert la.residual_update(x, A, B, 1.0, act, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_the_dense_update_of_bf16_adapters_computes_in_float32(eager):
    """loran_update (the DENSE path) with bf16 x, A and B (a model cast to bf16): forward and backward cast A and B
    to float32 for Z = B A and f(Z); output and gradients close to float64 math, gradients in bf16."""
    from loran.activations import Activation

    gen = torch.Generator().manual_seed(12)
    x0, A0, B0 = (torch.randn(*shape, generator=gen).to(torch.bfloat16) * 0.5 for shape in ((4, 6), (3, 6), (7, 3)))
    x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
    rx, rA, rB = (t.double().requires_grad_() for t in (x0, A0, B0))
    y = la.loran_update(x, A, B, 1.5, Activation("sinter", SINTER), chunk_rows=2, block_rows=4)
    Z = rB @ rA
    ref = 1.5 * rx @ (Z + 0.5 * Z * torch.sin(30.0 * Z)).T
    y.float().pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert relative(y, ref.detach()) < 1e-2
    for got, want in ((x.grad, rx.grad), (A.grad, rA.grad), (B.grad, rB.grad)):
        assert got.dtype == torch.bfloat16 and relative(got, want) < 2e-2
