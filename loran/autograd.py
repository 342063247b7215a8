"""The LoRAN layer ``y = x @ (W0 + sum_a s_a f_a(B_a A_a))^T + b`` and its gradients, without keeping f(B A).

Shapes: x (..., d_in), A (r, d_in), B (d_out, r), W0 (d_out, d_in), y (..., d_out); f acts element-wise on
Z = B A (d_out x d_in). Everything is computed in float32 (float64 if given float64: ``compute_dtype``) unless a
compute dtype is passed (``dtype=``), also under bf16/fp16 autocast: at the released Sinter settings f(Z) differs
from Z by at most 5e-5 relative, which bf16 (eps 8e-3) would round away. The adapter config's ``update_dtype``
policy decides which dtype a layer passes (loran/config.py); ``lowrank_update`` is LoRA's s (x A^T) B^T in a given
dtype, for the rows whose f is the identity.

Two interchangeable forms:

- ``loran_linear`` / ``loran_update``: the training path (``_LoranLinear``). It keeps only x, A and B for
  backward (plus a reference to the frozen base weight, a parameter that lives anyway) and recomputes Z, so no
  d_out x d_in tensor lives between forward and backward. Cost in multiply-adds, N tokens:

      forward   Z = B A (d_out d_in r),  W = W0 + s f(Z),  y = x W^T        (N d_out d_in)
      backward  Z again (d_out d_in r),  W again,  dL/dx = g W              (N d_out d_in)
                G = g^T x (N d_out d_in),  dL/dZ = s G * f'(Z)
                dL/dB = dL/dZ A^T,  dL/dA = B^T dL/dZ                       (2 d_out d_in r)

  that is 3 N d_out d_in + 4 d_out d_in r against LoRA's 2 N d_out d_in + 3 N (d_in + d_out) r: about 1.5x a
  frozen layer, against 2.5x for plain autograd through f(B A) (``reference_update``). With W0 given, the
  update is folded into the weight, one matmul per pass for base and update together ("fold"); this is exact
  only when base and update see the same input, i.e. with no active dropout. With dropout the update is
  ``loran_update`` (W0 = None, added onto the base layer's result): the base and the update then need their
  own matmuls, 5 N d_out d_in in all, as plain autograd, but without its d_out x d_in tensors.

  Rows of W (and of G) are processed in blocks of ``BLOCK_ELEMENTS``, which bounds the transient memory. The
  element-wise work (f(Z), f'(Z) and the sums with W0 and G) is as expensive as the matmuls when done with eager
  ops on whole matrices (memory-bound, one pass per op): it is one fused kernel per block from ``torch.compile``
  where that is available and worth it (``COMPILE``), else eager ops on cache-sized chunks (``CHUNK_ELEMENTS``).

- ``residual_update``: the dense half of the residual split (loran/variants.py, Path.RESIDUAL). For a centred f,
  f(z) = c z + g(z) (``Activation.split``), so s x f(B A)^T = c s (x A^T) B^T + s x g(B A)^T: the first term is
  LoRA's low-rank product, and only s x g(B A)^T needs a d_out x d_in matrix. It keeps x, A, B for backward and
  recomputes Z = B A per row block:

      forward   Z = B A (d_out d_in r),  y = x (s g(Z))^T                       (N d_out d_in)
      backward  Z again (d_out d_in r),  dL/dx = g_y (s g(Z))                   (N d_out d_in)
                G = g_y^T x (N d_out d_in),  dL/dZ = s G * g'(Z)
                dL/dB = dL/dZ A^T,  dL/dA = B^T dL/dZ                           (2 d_out d_in r)

  Z and g(Z) are computed in float32 (float64 for float64 x), IEEE (no TF32/bf16 inside the matmul: sin(omega Z)
  runs at 14-35 rad, so Z's relative error becomes phase error); the three N-sized products run in `dtype` (bf16
  under the "autocast" policy, with float32 accumulation; g(Z) rounded to it), dL/dZ, dL/dA, dL/dB in float32.
  The element-wise work is the dense path's, with (g, g') for (f, f'): the same row blocks, chunks and fused
  kernels (W_g = s g(Z), then dL/dZ = s G * g'(Z) in place in G), so the split costs the dense path's time and
  memory for the same layer plus LoRA's c s (x A^T) B^T.

- ``reference_update``: plain autograd through f(B A), as the official code does (keeps about four
  d_out x d_in tensors per module). Kept as the reference the tests compare against.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from loran.activations import Activation

log = logging.getLogger(__name__)

# Rows are processed in blocks of about BLOCK_ELEMENTS elements of W (2**22: 16 MiB in fp32), which bounds the
# transient memory (a W block and a G block at a time) while keeping the matmuls large: fewer, larger ops also
# keep the threads in step (small ops are slow when a thread is descheduled on a busy machine). Inside a block,
# eager element-wise ops run on chunks of CHUNK_ELEMENTS (2**16: 256 KiB), so that f, f' and their temporaries
# stay in a 1-2 MiB L2 cache; a fused (compiled) kernel has no temporaries and takes the whole block, which
# amortises its call overhead (~60 us). results/bench.md has the measurements behind these defaults.
BLOCK_ELEMENTS = 2**22
CHUNK_ELEMENTS = 2**16
COMPILED_CHUNK_ELEMENTS = 2**22
# Fused element-wise kernels from torch.compile: "auto" uses them for layers with at least COMPILE_MIN_ELEMENTS
# weights (compiling costs seconds once per activation and process, then is cached on disk), "always", "never".
# None: the environment variable LORAN_COMPILE decides, read at each call (else "auto"); set COMPILE to override it.
# A failed compile falls back to eager ops with a warning.
COMPILE: str | None = None
COMPILE_MIN_ELEMENTS = 2**16


class DenseWeight(NamedTuple):
    """A dense base weight in the compute dtype, (d_out, d_in); `fresh`: a copy (dequantised) that may be
    overwritten, rather than the parameter itself."""

    weight: Tensor
    fresh: bool


WeightFn = Callable[[torch.dtype], DenseWeight]


class Adapter(NamedTuple):
    """One LoRAN adapter: A (r, d_in), B (d_out, r), scaling s and activation f."""

    A: Tensor
    B: Tensor
    scaling: float
    act: Activation


def _no_autocast(device_type: str):
    """Autocast off on `device_type`, the device the tensors live on (a CUDA machine can compute on the CPU too)."""
    return torch.autocast(device_type=device_type, enabled=False)


@contextlib.contextmanager
def ieee_float32():
    """float32 matmuls in full float32 (no TF32, no bf16 passes inside them) for the block, whatever the process set."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype LoRAN computes in unless told otherwise: float64 for a float64 tensor, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def widened(t: Tensor) -> Tensor:
    """t in its ``compute_dtype``: float32, or float64 if it already is (never narrowed, never copied needlessly)."""
    return t.to(compute_dtype(t))


def chunk_rows_for(d_in: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of a d_in-wide matrix in about `elements` elements, at least one."""
    return max(1, elements // max(1, d_in))


def delta_weight(A: Tensor, B: Tensor, act: Activation, dtype: torch.dtype | None = None) -> Tensor:
    """f(B A) in `dtype` (default float32, float64 for float64 factors), shape (d_out, d_in)."""
    with _no_autocast(A.device.type):
        if dtype is None:
            return act.f(widened(B) @ widened(A))
        return act.f(B.to(dtype) @ A.to(dtype))


def reference_update(x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation,
                     dtype: torch.dtype | None = None) -> Tensor:
    """s * x @ f(B A)^T through plain autograd (the official code's memory profile), in `dtype` (default float32,
    float64 for float64 input)."""
    with _no_autocast(x.device.type):
        if dtype is None:
            return (widened(x) @ delta_weight(A, B, act).T) * scaling
        return (x.to(dtype) @ delta_weight(A, B, act, dtype).T) * scaling


class _LowRankUpdate(torch.autograd.Function):
    """s (x A^T) B^T computed in `dtype` from x in its own dtype; keeps x as given (not a wider copy), A, B and the
    thin x A^T for backward, as autocast's LoRA keeps its inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
        with _no_autocast(x.device.type):
            xa = x.to(dtype) @ A.to(dtype).T
            y = (xa @ B.to(dtype).T) * scaling
        ctx.save_for_backward(x, A, B, xa)
        ctx.scaling, ctx.dtype = scaling, dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, A, B, xa = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        with _no_autocast(x.device.type):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(dt) * s
            g_xa = g @ B.to(dt)  # dL/d(x A^T), (N, r)
            grad_x = (g_xa @ A.to(dt)).reshape(x.shape).to(x.dtype) if need_x else None
            grad_A = (g_xa.T @ x.reshape(-1, x.shape[-1]).to(dt)).to(A.dtype) if need_A else None
            grad_B = (g.T @ xa.reshape(-1, xa.shape[-1])).to(B.dtype) if need_B else None
        return grad_x, grad_A, grad_B, None, None


def lowrank_update(x: Tensor, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """LoRA's update s (x A^T) B^T computed in `dtype` with autocast off, output in `dtype`; autograd keeps x in its
    own dtype. The path of every adapter whose f is the identity when its update must be cast (loran/variants.py)."""
    return _LowRankUpdate.apply(x, A, B, float(scaling), dtype)


class _ResidualUpdate(torch.autograd.Function):
    """s x g(B A)^T, g the residual of a centred f (module docstring, ``residual_update``); keeps x, A, B only.

    The element-wise work runs on DENSE's kernels (``KERNELS``, row blocks and chunks as ``_LoranLinear``) with
    (g, g') in place of (f, f'): per block of rows, W_g = s g(Z) into a float32 (float64) buffer, then rounded to the
    products' dtype (a no-op under the float32 policy); in backward dL/dZ = s G * g'(Z) in place in G = g_y^T x."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation, dtype: torch.dtype | None,
                block_rows: int | None) -> Tensor:
        zt = compute_dtype(x)  # Z = B A and g(Z): float32 (float64 for float64 x)
        pt = dtype or zt  # the N-sized products
        g = act.split.g
        d_out, d_in = B.shape[0], A.shape[1]
        compiled = KERNELS.use_compiled(d_out * d_in)
        rows, blocks = _sizes((block_rows, block_rows), d_in, compiled)
        with _no_autocast(x.device.type), ieee_float32():
            A_, B_ = A.to(zt), B.to(zt)
            x2 = x.reshape(-1, d_in).to(pt)
            y = torch.empty(x2.shape[0], d_out, dtype=pt, device=x.device)
            for blk in _blocks(d_out, blocks):
                w = torch.empty(blk.stop - blk.start, d_in, dtype=zt, device=x.device)
                for sl in _blocks(w.shape[0], rows):
                    KERNELS.weight(compiled, w[sl], B_[blk][sl], A_, None, scaling, g, False)
                torch.mm(x2, w.to(pt).T, out=y[:, blk])
                del w
        ctx.save_for_backward(x, A, B)
        ctx.scaling, ctx.act, ctx.dtypes, ctx.block_rows = scaling, act, (zt, pt), block_rows
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, A, B = ctx.saved_tensors
        (zt, pt), s, split = ctx.dtypes, ctx.scaling, ctx.act.split
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        d_out, d_in = B.shape[0], A.shape[1]
        compiled = KERNELS.use_compiled(d_out * d_in)
        rows, blocks = _sizes((ctx.block_rows, ctx.block_rows), d_in, compiled)
        grad_x = grad_A = grad_B = None
        with _no_autocast(x.device.type), ieee_float32():
            A_, B_ = A.to(zt), B.to(zt)
            x2 = x.reshape(-1, d_in).to(pt)
            g2 = grad_y.reshape(-1, d_out).to(pt)
            if need_A:
                grad_A = torch.zeros_like(A_)
            if need_B:
                grad_B = torch.empty_like(B_)
            for blk in _blocks(d_out, blocks):
                w = torch.empty(blk.stop - blk.start, d_in, dtype=zt, device=x.device) if need_x else None
                grad_z = (g2[:, blk].T @ x2).to(zt) if (need_A or need_B) else None  # G, then s G * g'(Z) in place
                for sl in _blocks(blk.stop - blk.start, rows):
                    out, Bs = None if w is None else w[sl], B_[blk][sl]
                    if grad_z is not None:
                        KERNELS.grad(compiled, out, None, grad_z[sl], Bs, A_, None, s, split.g, split.dg, False)
                    elif out is not None:
                        KERNELS.weight(compiled, out, Bs, A_, None, s, split.g, False)
                if need_x:
                    w = w.to(pt)
                    grad_x = g2[:, blk] @ w if grad_x is None else grad_x.addmm_(g2[:, blk], w)
                if grad_z is not None:
                    if need_B:
                        torch.mm(grad_z, A_.T, out=grad_B[blk])
                    if need_A:
                        grad_A.addmm_(B_[blk].T, grad_z)
                del w, grad_z
        return (None if grad_x is None else grad_x.reshape(x.shape).to(x.dtype),
                None if grad_A is None else grad_A.to(A.dtype), None if grad_B is None else grad_B.to(B.dtype),
                None, None, None, None)


def residual_update(x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation, dtype: torch.dtype | None = None,
                    block_rows: int | None = None) -> Tensor:
    """s x g(B A)^T for a centred f = c z + g(z) (``act.split``), output in `dtype` (default float32, float64 for
    float64 x); Z = B A and g(Z) in float32 IEEE, recomputed in row blocks in backward (module docstring).
    `block_rows`: rows per block and per element-wise chunk (default: as the dense path, BLOCK_ELEMENTS and
    CHUNK_ELEMENTS / COMPILED_CHUNK_ELEMENTS)."""
    if act.split is None:
        raise ValueError(f"residual_update needs a centred activation (f(0) = 0); {act} is not")
    return _ResidualUpdate.apply(x, A, B, float(scaling), act, dtype, block_rows)


def _weight_kernel(out: Tensor, B: Tensor, A: Tensor, base: Tensor | None, s: float, f: Callable,
                   accumulate: bool) -> None:
    """out = base + s f(B A) (base None: 0; accumulate: out += s f(B A))."""
    _write_weight(out, f(B @ A), base, s, accumulate)


def _write_weight(out: Tensor, fz: Tensor, base: Tensor | None, s: float, accumulate: bool) -> None:
    """out = base + s fz (base None: s fz; accumulate: out += s fz)."""
    if accumulate:
        out.add_(fz, alpha=s)
    elif base is None:
        torch.mul(fz, s, out=out)
    else:
        torch.add(base, fz, alpha=s, out=out)


def _grad_kernel(out: Tensor | None, grad_z: Tensor | None, G: Tensor, B: Tensor, A: Tensor, base: Tensor | None,
                 s: float, f: Callable, df: Callable, accumulate: bool) -> None:
    """out = base + s f(Z) as in _weight_kernel (skipped if out is None) and grad_z = s G f'(Z) (None: into G),
    Z = B A computed once."""
    z = B @ A
    if out is not None:
        _write_weight(out, f(z), base, s, accumulate)
    torch.mul(G, df(z), out=G if grad_z is None else grad_z).mul_(s)


# The same two kernels for torch.compile: one fused loop over the block for the element-wise work, after the
# matmul B A (which inductor leaves to the BLAS library). Written as expressions (no out= ops) for inductor.
def _fused_write(out, value, base, accumulate: bool) -> None:
    if accumulate:
        out.add_(value)
    elif base is None:
        out.copy_(value)
    else:
        out.copy_(base + value)


def _fused_weight_kernel(out, B, A, base, s: float, f, accumulate: bool) -> None:
    _fused_write(out, s * f(B @ A), base, accumulate)


def _fused_grad_kernel(out, grad_z, G, B, A, base, s: float, f, df, accumulate: bool) -> None:
    z = B @ A
    if out is not None:
        _fused_write(out, s * f(z), base, accumulate)
    if grad_z is None:  # never pass G twice: aliased inputs of a compiled function are not handled here
        G.mul_(s * df(z))
    else:
        grad_z.copy_(G * (s * df(z)))


# Not mutated by `make mutate`: under mutmut, torch.compile cannot trace the mutation trampolines (minutes of failing
# compile per mutant). test_kernel_dispatch_with_a_stand_in_compiler covers this class instead (results/mutation.md).
# pragma: no mutate start
class _Kernels:
    """The eager kernels, or torch.compile'd ones (compiled lazily; a failed compile falls back to eager ops)."""

    # Each activation and each combination of the flags is a graph of its own: allow more than dynamo's default 8.
    RECOMPILE_LIMIT = 64

    def __init__(self):
        self.compiled = None
        self.failed = False

    def use_compiled(self, numel: int) -> bool:
        mode = (COMPILE or os.environ.get("LORAN_COMPILE", "auto")).lower()
        # Under a Python dispatch mode (memory tracking, FakeTensor, ...) dynamo does not compile: run eagerly.
        if self.failed or mode in ("never", "0", "false", "off") or _get_current_dispatch_mode() is not None:
            return False
        return mode in ("always", "1", "true", "on") or numel >= COMPILE_MIN_ELEMENTS

    def _get(self):
        if self.compiled is None:
            # Raised once for the process rather than patched around each call: a config.patch per call costs
            # ~0.3 ms (more than the fused kernel of a small layer), 60 calls per SmolLM2 step.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, self.RECOMPILE_LIMIT)
            opts = dict(dynamic=True, fullgraph=True)
            self.compiled = (torch.compile(_fused_weight_kernel, **opts), torch.compile(_fused_grad_kernel, **opts))
        return self.compiled

    def _call(self, which: int, eager: Callable, args: tuple) -> None:
        if self.failed:
            eager(*args)
            return
        try:
            self._get()[which](*args)
        except Exception as err:  # no C++ compiler, unsupported platform, too many graphs: eager from now on
            self.failed = True
            log.warning("LoRAN: torch.compile of the element-wise work failed (%s: %s); using eager ops",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            eager(*args)

    def weight(self, compiled: bool, *args) -> None:
        (self._call(0, _weight_kernel, args) if compiled else _weight_kernel(*args))

    def grad(self, compiled: bool, *args) -> None:
        (self._call(1, _grad_kernel, args) if compiled else _grad_kernel(*args))


# pragma: no mutate end
KERNELS = _Kernels()


def _blocks(n: int, rows: int) -> list[slice]:
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _sizes(sizes: tuple[int | None, int | None], d_in: int, compiled: bool) -> tuple[int, int]:
    """(rows per element-wise chunk, rows per matmul block), from the caller's choice or the defaults."""
    chunk_rows, block_rows = sizes
    chunk_rows = chunk_rows or chunk_rows_for(d_in, COMPILED_CHUNK_ELEMENTS if compiled else CHUNK_ELEMENTS)
    return chunk_rows, max(chunk_rows, block_rows or chunk_rows_for(d_in, BLOCK_ELEMENTS))


# ----------------------------------------------------------------------------------------------------------------


class _LoranLinear(torch.autograd.Function):
    """y = [result +] x @ (W0 + sum_a s_a f_a(B_a A_a))^T [+ bias]; see the module docstring for the cost."""

    @staticmethod
    def forward(ctx, x: Tensor, result: Tensor | None, bias: Tensor | None, weight_fn: WeightFn | None,
                meta: tuple[tuple[float, Activation], ...], sizes: tuple[int, int], dtype: torch.dtype | None,
                *ab: Tensor) -> Tensor:
        dt = dtype or compute_dtype(x)
        with _no_autocast(x.device.type):
            adapters = [(ab[2 * i].to(dt), ab[2 * i + 1].to(dt), s, act.pointwise) for i, (s, act) in enumerate(meta)]
            d_out, d_in = adapters[0][1].shape[0], adapters[0][0].shape[1]
            compiled = KERNELS.use_compiled(d_out * d_in)
            rows, block_rows = _sizes(sizes, d_in, compiled)
            base = weight_fn(dt) if weight_fn is not None else None
            x2 = x.reshape(-1, d_in).to(dt)
            acc = None  # what the matmul adds onto: result and/or bias
            if result is not None and result.dtype == dt:
                acc = result.reshape(-1, d_out)
            if bias is not None:
                acc = bias.to(dt) if acc is None else acc + bias.to(dt)
            blocks = _blocks(d_out, block_rows)
            y = None if len(blocks) == 1 else torch.empty(x2.shape[0], d_out, dtype=dt, device=x.device)
            for blk in blocks:
                fresh = base is not None and base.fresh
                weight = base.weight[blk] if fresh else torch.empty(blk.stop - blk.start, d_in, dtype=dt,
                                                                    device=x.device)
                for sl in _blocks(weight.shape[0], rows):
                    rz = slice(blk.start + sl.start, blk.start + sl.stop)
                    for i, (A, B, s, pw) in enumerate(adapters):
                        base_rows = None if (base is None or fresh or i > 0) else base.weight[rz]
                        KERNELS.weight(compiled, weight[sl], B[rz], A, base_rows, s, pw.f, fresh or i > 0)
                a = None if acc is None else (acc[blk] if acc.dim() == 1 else acc[:, blk])
                if y is None:
                    y = x2 @ weight.T if a is None else torch.addmm(a, x2, weight.T)
                elif a is None:
                    torch.mm(x2, weight.T, out=y[:, blk])
                else:
                    torch.addmm(a, x2, weight.T, out=y[:, blk])
                del weight
            if result is not None and result.dtype != dt:
                y = result.reshape(-1, d_out) + y.to(result.dtype)
            del base
        ctx.save_for_backward(x, *ab)
        ctx.weight_fn, ctx.meta, ctx.sizes, ctx.dt = weight_fn, meta, sizes, dt
        ctx.has_bias, ctx.has_result = bias is not None, result is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, *ab = ctx.saved_tensors
        meta = ctx.meta
        need_x, need_result, need_bias = ctx.needs_input_grad[:3]
        need_ab = ctx.needs_input_grad[7:]
        dt = ctx.dt
        with _no_autocast(x.device.type):
            adapters = [(ab[2 * i].to(dt), ab[2 * i + 1].to(dt), s, act.pointwise) for i, (s, act) in enumerate(meta)]
            d_out, d_in = adapters[0][1].shape[0], adapters[0][0].shape[1]
            compiled = KERNELS.use_compiled(d_out * d_in)
            rows, block_rows = _sizes(ctx.sizes, d_in, compiled)
            x2 = x.reshape(-1, d_in).to(dt)
            g2 = grad_y.reshape(-1, d_out).to(dt)
            base = ctx.weight_fn(dt) if (need_x and ctx.weight_fn is not None) else None
            fresh = base is not None and base.fresh
            train = [need_ab[2 * i] or need_ab[2 * i + 1] for i in range(len(adapters))]
            last = max((i for i, t in enumerate(train) if t), default=-1)
            grads_A = [torch.zeros_like(A) if t else None for t, (A, _, _, _) in zip(train, adapters)]
            grads_B = [torch.empty_like(B) if t else None for t, (_, B, _, _) in zip(train, adapters)]
            grad_x = None
            for blk in _blocks(d_out, block_rows):
                n_rows = blk.stop - blk.start
                weight = None
                if need_x:
                    weight = base.weight[blk] if fresh else torch.empty(n_rows, d_in, dtype=dt, device=x.device)
                # G = g^T x for this block; dL/dZ_a = s_a G * f_a'(Z_a), in place in G for the last adapter.
                G = g2[:, blk].T @ x2 if last >= 0 else None
                grad_z = [G if i == last else (torch.empty_like(G) if t else None) for i, t in enumerate(train)]
                for sl in _blocks(n_rows, rows):
                    rz = slice(blk.start + sl.start, blk.start + sl.stop)
                    for i, (A, B, s, pw) in enumerate(adapters):
                        out = None if weight is None else weight[sl]
                        base_rows = None if (base is None or fresh or i > 0) else base.weight[rz]
                        if train[i]:
                            KERNELS.grad(compiled, out, None if i == last else grad_z[i][sl], G[sl], B[rz], A,
                                         base_rows, s, pw.f, pw.df, fresh or i > 0)
                        elif out is not None:
                            KERNELS.weight(compiled, out, B[rz], A, base_rows, s, pw.f, fresh or i > 0)
                if need_x:
                    grad_x = g2[:, blk] @ weight if grad_x is None else grad_x.addmm_(g2[:, blk], weight)
                for i, (A, B, _, _) in enumerate(adapters):
                    if train[i]:
                        torch.mm(grad_z[i], A.T, out=grads_B[i][blk])
                        grads_A[i].addmm_(B[blk].T, grad_z[i])
                del weight, G, grad_z
            del base
            grad_x = grad_x.reshape(x.shape).to(x.dtype) if need_x else None
            grad_bias = g2.sum(0).to(ctx.bias_dtype) if (need_bias and ctx.has_bias) else None
        grad_result = grad_y if (need_result and ctx.has_result) else None
        grads_ab = []
        for i, (a, b) in enumerate(zip(ab[0::2], ab[1::2])):
            grads_ab.append(grads_A[i].to(a.dtype) if need_ab[2 * i] else None)
            grads_ab.append(grads_B[i].to(b.dtype) if need_ab[2 * i + 1] else None)
        return (grad_x, grad_result, grad_bias, None, None, None, None, *grads_ab)


def loran_linear(x: Tensor, weight_fn: WeightFn | None, bias: Tensor | None, adapters: Sequence[Adapter],
                 result: Tensor | None = None, chunk_rows: int | None = None, block_rows: int | None = None,
                 dtype: torch.dtype | None = None) -> Tensor:
    """[result +] x @ (W0 + sum_a s_a f_a(B_a A_a))^T [+ bias], computed in `dtype` (default float32, float64 for
    float64 input); keeps no d_out x d_in tensor.

    `weight_fn(dtype)` gives the frozen base weight W0 as a (d_out, d_in) ``DenseWeight`` (None: W0 = 0); it is
    called again in backward when dL/dx is needed. The output has x's dtype when W0 is given, result's when
    `result` is given, else the compute dtype (float32; float64 for float64 input).
    """
    if not adapters:
        raise ValueError("loran_linear needs at least one adapter")
    meta = tuple((float(a.scaling), a.act) for a in adapters)
    ab = [t for a in adapters for t in (a.A, a.B)]
    y = _LoranLinear.apply(x, result, bias, weight_fn, meta, (chunk_rows, block_rows), dtype, *ab)
    return y.to(x.dtype) if (weight_fn is not None and result is None) else y


def loran_update(x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation, chunk_rows: int | None = None,
                 result: Tensor | None = None, block_rows: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """[result +] s * x @ f(B A)^T in `dtype` (default float32); backward recomputes f(B A) from A and B in row
    chunks."""
    return loran_linear(x, None, None, [Adapter(A, B, scaling, act)], result=result, chunk_rows=chunk_rows,
                        block_rows=block_rows, dtype=dtype)
