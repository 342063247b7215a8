"""The LoRAN update ``y = s * x @ f(B A)^T`` and its gradients, in two interchangeable forms.

Shapes: x (..., d_in), A (r, d_in), B (d_out, r), y (..., d_out); f acts element-wise on Z = B A
(d_out x d_in). Everything is computed in float32 (float64 if given float64), also under bf16/fp16
autocast: at the released Sinter settings f(Z) differs from Z by at most 5e-5 relative, which bf16
(eps 8e-3) would round away.

- ``loran_update``: the training path. Backward keeps only x, A and B and recomputes f(Z) and f'(Z) in row
  chunks of Z, so no d_out x d_in tensor lives between forward and backward:
      G      = s * g^T x                     (rows of d_out x d_in, one chunk at a time)
      dL/dZ  = G * f'(Z)
      dL/dB  = dL/dZ A^T,   dL/dA = B^T dL/dZ,   dL/dx = s * g f(Z)
- ``reference_update``: plain autograd through f(B A), as the official code does (keeps about four
  d_out x d_in tensors per module). Kept as the reference the tests compare against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from loran.activations import Activation

# Rows of Z recomputed at once in backward: 2**22 elements (16 MiB in fp32) bounds the transient memory.
CHUNK_ELEMENTS = 2**22


def _no_autocast():
    return torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", enabled=False)


def _up(t: Tensor) -> Tensor:
    """t in float32, or float64 if it already is."""
    return t if t.dtype == torch.float64 else t.float()


def delta_weight(A: Tensor, B: Tensor, act: Activation) -> Tensor:
    """f(B A) in float32, shape (d_out, d_in)."""
    with _no_autocast():
        return act.f(_up(B) @ _up(A))


def reference_update(x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation) -> Tensor:
    """s * x @ f(B A)^T through plain autograd (the official code's memory profile)."""
    with _no_autocast():
        return (_up(x) @ delta_weight(A, B, act).T) * scaling


class _LoranUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation, chunk_rows: int) -> Tensor:
        with _no_autocast():
            y = (_up(x) @ delta_weight(A, B, act).T) * scaling
        ctx.save_for_backward(x, A, B)
        ctx.scaling, ctx.act, ctx.chunk_rows = scaling, act, chunk_rows
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, A, B = ctx.saved_tensors
        s, act, rows = ctx.scaling, ctx.act, ctx.chunk_rows
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        with _no_autocast():
            x2 = _up(x.reshape(-1, x.shape[-1]))
            g2 = _up(grad_y.reshape(-1, grad_y.shape[-1]))
            A32, B32 = _up(A), _up(B)
            grad_x = torch.zeros_like(x2) if need_x else None
            grad_A = torch.zeros_like(A32) if need_A else None
            grad_B = torch.empty_like(B32) if need_B else None
            for start in range(0, B32.shape[0], rows):
                sl = slice(start, start + rows)
                z = B32[sl] @ A32  # (rows, d_in)
                g = g2[:, sl]  # (N, rows)
                if need_x:
                    grad_x.addmm_(g, act.f(z), alpha=s)
                if need_A or need_B:
                    grad_z = (g.T @ x2).mul_(act.df(z)).mul_(s)  # (rows, d_in)
                    if need_B:
                        grad_B[sl] = grad_z @ A32.T
                    if need_A:
                        grad_A.addmm_(B32[sl].T, grad_z)
        return (
            grad_x.reshape(x.shape).to(x.dtype) if need_x else None,
            grad_A.to(A.dtype) if need_A else None,
            grad_B.to(B.dtype) if need_B else None,
            None,
            None,
            None,
        )


def loran_update(x: Tensor, A: Tensor, B: Tensor, scaling: float, act: Activation, chunk_rows: int | None = None) -> Tensor:
    """s * x @ f(B A)^T in float32; backward recomputes f(B A) from A and B in row chunks."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // A.shape[1])
    return _LoranUpdate.apply(x, A, B, scaling, act, chunk_rows)
