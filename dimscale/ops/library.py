"""Autograd for the selective-scan custom ops: one forward op and one backward op per kernel (C and Triton).

Both kernels share the op signatures
    fwd(u, delta, A, B, C, D, z, bias, softplus, chunk) -> (out, states)      states[:, -1] = the last state
    bwd(u, delta, A, B, C, D, z, bias, states, gout, glast, softplus, chunk) -> [du, ddelta, dA, dB, dC, dD, dz, dbias]
with absent optional gradients returned as empty tensors, so `torch.compile` traces both passes as opaque ops.
"""
from __future__ import annotations


def register_scan_autograd(fwd, bwd):
    """Make `fwd` differentiable through `bwd` (the backward recomputes from the saved per-chunk states)."""

    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, bias, softplus, chunk = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, output[1])
        ctx.softplus, ctx.chunk = softplus, chunk

    def backward(ctx, gout, gstates):
        u, delta, A, B, C, D, z, bias, states = ctx.saved_tensors
        glast = None if gstates is None else gstates[:, -1]
        grads = bwd(u, delta, A, B, C, D, z, bias, states, gout, glast, ctx.softplus, ctx.chunk)
        opt = [None if x is None else g for x, g in zip((D, z, bias), grads[5:])]
        return (*grads[:5], opt[0], opt[1], opt[2], None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
