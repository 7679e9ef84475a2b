"""Triton kernels (dimscale/ops/triton_scan.py) under Triton's CPU interpreter equal the references.

TRITON_INTERPRET must be set before triton is imported, so `test_triton_kernels_under_the_interpreter` reruns
this file in a subprocess with it set; there the other tests run, here they are skipped (nothing leaks into
the other test modules of this process). Sizes are tiny: the interpreter runs every program in numpy.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed, 1 skipped" in summary and "failed" not in summary, summary   # only this test itself skips


def make_inputs(L, dtype=torch.float32, batch=2, dim=20, N=4, seed=0):
    """Mamba-1 scan inputs as leaf tensors: u, delta, z (B, D, L) over (B, L, D) memory as Mamba makes them."""
    g = torch.Generator().manual_seed(seed)
    bdl = lambda: torch.randn(batch, L, dim, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    xs = dict(u=bdl(), delta=bdl(), A=-torch.rand(dim, N, generator=g) - 0.1,
              B=torch.randn(batch, N, L, generator=g).to(dtype), C=torch.randn(batch, N, L, generator=g).to(dtype),
              D=torch.randn(dim, generator=g), z=bdl(), delta_bias=torch.randn(dim, generator=g))
    return {k: v.requires_grad_() for k, v in xs.items()}


def run(fn, xs, softplus=True, **kw):
    """Forward + backward of a weighted sum of the output and of the last state: (out, last, grads)."""
    out, last = fn(**xs, delta_softplus=softplus, return_last_state=True, **kw)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    ((out.float() * w).sum() + last.sin().sum()).backward()
    return out.detach(), last.detach(), {k: v.grad for k, v in xs.items()}


def assert_close(ref, got, atol, gatol, rtol):
    assert got[0].dtype == ref[0].dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), ref[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], ref[1], atol=atol, rtol=rtol)
    for k in ref[2]:
        assert got[2][k] is not None and got[2][k].dtype == ref[2][k].dtype, k
        torch.testing.assert_close(got[2][k].float(), ref[2][k].float(), atol=gatol, rtol=rtol, msg=k)


@inner
@pytest.mark.parametrize("L", [16, 13, 1])          # 2 chunks of 8; a partial last chunk; one step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_equals_reference(L, dtype):
    from dimscale.ops import selective_scan_ref
    from dimscale.ops.triton_scan import selective_scan_triton
    ref = run(selective_scan_ref, make_inputs(L, dtype))
    got = run(selective_scan_triton, make_inputs(L, dtype), chunk=8)
    tol = dict(atol=1e-5, gatol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, gatol=5e-2, rtol=2e-2)
    assert_close(ref, got, **tol)


@inner
@pytest.mark.parametrize("drop,softplus", [(("D", "z", "delta_bias"), False), (("z",), True)])
def test_triton_scan_optional_arguments(drop, softplus):
    """Without D, z or the delta bias, and without softplus (delta then positive, as a step must be)."""
    from dimscale.ops import selective_scan_ref
    from dimscale.ops.triton_scan import selective_scan_triton

    def inputs():
        xs = {k: v for k, v in make_inputs(11, dim=6).items() if k not in drop}
        if not softplus:
            xs["delta"] = xs["delta"].detach().abs().requires_grad_()
        return xs
    assert_close(run(selective_scan_ref, inputs(), softplus), run(selective_scan_triton, inputs(), softplus, chunk=4),
                 atol=1e-5, gatol=1e-4, rtol=1e-4)


@inner
@pytest.mark.parametrize("L,activation,bias,dtype", [(16, "silu", True, torch.float32), (11, None, False, torch.float32),
                                                     (11, "silu", True, torch.bfloat16)])
def test_triton_causal_conv_equals_reference(L, activation, bias, dtype):
    from dimscale.ops import causal_conv1d_shifted
    from dimscale.ops.triton_scan import causal_conv1d_triton
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, 40, generator=g).to(dtype).transpose(1, 2)   # 2 channel blocks of 32, time blocks of 8
    w, b = torch.randn(40, 3, generator=g), torch.randn(40, generator=g)
    res = []
    for fn in (causal_conv1d_shifted, lambda *a, **k: causal_conv1d_triton(*a, **k, block_t=8)):
        xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_() if bias else None
        with torch.autocast("cpu", enabled=False):
            out = fn(xi.float(), wi, bi, activation=activation).to(dtype) if dtype == torch.bfloat16 and \
                fn is causal_conv1d_shifted else fn(xi, wi, bi, activation=activation)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        res.append([out, xi.grad, wi.grad] + ([bi.grad] if bias else []))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for want, got in zip(*res):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@inner
def test_triton_custom_ops_pass_opcheck():
    from dimscale.ops import triton_scan
    xs = {k: v.detach() for k, v in make_inputs(9, dim=6).items()}
    args = (xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"], xs["z"], xs["delta_bias"], True, 4)
    grad = lambda *a: [x.requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in a]
    torch.library.opcheck(triton_scan.scan_triton_fwd, grad(*(x.clone() if isinstance(x, torch.Tensor) else x
                                                               for x in args)))
    out, states = triton_scan.scan_triton_fwd(*args)
    torch.library.opcheck(triton_scan.scan_triton_bwd, (*args[:8], states, torch.randn_like(out),
                                                        torch.randn_like(states[:, -1]), True, 4))
    x, w, b = torch.randn(2, 6, 9).transpose(1, 2).contiguous().transpose(1, 2), torch.randn(6, 3), torch.randn(6)
    torch.library.opcheck(triton_scan.causal_conv1d_triton_fwd, (x.requires_grad_(), w.requires_grad_(),
                                                                  b.requires_grad_(), True, 8))
    torch.library.opcheck(triton_scan.causal_conv1d_triton_bwd, (x.detach(), w.detach(), b.detach(),
                                                                  torch.randn(2, 6, 9), True, 8))


@inner
def test_triton_backend_on_cpu_tensors_and_a_mamba_layer():
    """`backend='triton'` takes CPU tensors under the interpreter; a Mamba layer on it equals the chunked one."""
    from dimscale.models import Mamba
    from dimscale.ops import resolve_backend, selective_scan_fn, selective_scan_ref
    assert resolve_backend("triton", "cpu") == "triton"
    xs = make_inputs(10, dim=6)
    torch.testing.assert_close(selective_scan_fn(**xs, delta_softplus=True, backend="triton"),
                               selective_scan_ref(**xs, delta_softplus=True), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    layers = [Mamba(8, d_state=4, scan_backend=b) for b in ("chunked", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    h = torch.randn(2, 11, 8)
    outs = []
    for layer in layers:
        hi = h.clone().requires_grad_()
        out = layer(hi)
        out.square().sum().backward()
        outs.append([out, hi.grad] + [p.grad for p in layer.parameters()])
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
