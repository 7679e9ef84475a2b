"""Selective scan and causal conv: the fast CPU path equals the naive reference (forward and backward)."""
import pytest
import torch
import torch.nn.functional as F

import os
import subprocess
import sys

from dimscale.ops import (causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_shifted, resolve_backend, scan_cpu,
                          selective_scan_chunked, selective_scan_cpu, selective_scan_fn, selective_scan_ref)


def make_inputs(L, dtype=torch.float32, batch=2, dim=6, N=4, seed=0, bc="variable"):
    """Random scan inputs as leaf tensors; A < 0 like Mamba's -exp(A_log)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    BC = {"variable": (batch, N, L), "grouped": (batch, 2, N, L), "constant": (dim, N)}[bc]
    xs = dict(u=r(batch, dim, L).to(dtype), delta=r(batch, dim, L).to(dtype), A=-torch.rand(dim, N, generator=g) - 0.1,
              B=r(*BC).to(dtype), C=r(*BC).to(dtype), D=r(dim), z=r(batch, dim, L).to(dtype), delta_bias=r(dim))
    return {k: v.requires_grad_() for k, v in xs.items()}


def close(ref, fast, atol=1e-5, gatol=1e-4):
    """Outputs, last states and every gradient of two `run`s agree."""
    assert torch.allclose(ref[0].float(), fast[0].float(), atol=atol, rtol=atol)
    assert torch.allclose(ref[1], fast[1], atol=atol, rtol=atol)
    for k in ref[2]:
        assert (ref[2][k] is None) == (fast[2][k] is None), k
        if ref[2][k] is not None:
            assert torch.allclose(ref[2][k].float(), fast[2][k].float(), atol=gatol, rtol=gatol), k


def run(fn, xs, **kw):
    """Forward + backward of a weighted sum; returns (out, last_state, grads)."""
    out, last = fn(**xs, delta_softplus=True, return_last_state=True, **kw)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * w).sum().backward()
    return out, last, {k: v.grad for k, v in xs.items()}


@pytest.mark.parametrize("L,chunk", [(32, 8), (37, 8), (50, 7), (5, 16), (1, 4), (64, None)])
@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
def test_chunked_equals_reference_fp32(L, chunk, bc):
    ref = run(selective_scan_ref, make_inputs(L, bc=bc))
    fast = run(selective_scan_chunked, make_inputs(L, bc=bc), chunk_size=chunk)
    assert torch.allclose(ref[0], fast[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(ref[1], fast[1], atol=1e-5, rtol=1e-5)
    for k in ref[2]:
        assert torch.allclose(ref[2][k], fast[2][k], atol=1e-4, rtol=1e-4), k


@pytest.mark.parametrize("L,chunk", [(24, 8), (29, 8)])
def test_chunked_equals_reference_bf16(L, chunk):
    ref = run(selective_scan_ref, make_inputs(L, torch.bfloat16))
    fast = run(selective_scan_chunked, make_inputs(L, torch.bfloat16), chunk_size=chunk)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32  # output in input dtype, state fp32
    assert torch.allclose(ref[0].float(), fast[0].float(), atol=2e-2, rtol=1e-2)
    for k in ref[2]:
        assert torch.allclose(ref[2][k].float(), fast[2][k].float(), atol=5e-2, rtol=2e-2), k


def test_reference_matches_closed_form_recurrence():
    """One channel, one state, no z/D: y_t = C_t h_t, h_t = e^{dt A} h_{t-1} + dt B_t u_t, checked by hand."""
    u, dt = torch.tensor([[[1.0, 2.0, -1.0]]]), torch.tensor([[[0.5, 1.0, 2.0]]])
    A, B, C = torch.tensor([[-1.0]]), torch.tensor([[[1.0, 0.5, 2.0]]]), torch.tensor([[[1.0, -1.0, 0.5]]])
    h, want = 0.0, []
    for t in range(3):
        h = torch.exp(dt[0, 0, t] * A[0, 0]) * h + dt[0, 0, t] * B[0, 0, t] * u[0, 0, t]
        want.append(C[0, 0, t] * h)
    for fn in (selective_scan_ref, selective_scan_chunked, selective_scan_cpu):
        assert torch.allclose(fn(u, dt, A, B, C)[0, 0], torch.stack(want), atol=1e-6)


# The compiled CPU kernel (dimscale/ops/csrc/selective_scan_cpu.c): blocks of 64 steps, tiles of 16 channels.
needs_cc = pytest.mark.skipif(not scan_cpu.available(), reason="no C compiler: the kernel cannot be built here")


@needs_cc
@pytest.mark.parametrize("L", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("dim,N", [(6, 4), (16, 16), (40, 16), (33, 64)])
def test_cpu_kernel_equals_reference_fp32(L, dim, N):
    ref = run(selective_scan_ref, make_inputs(L, dim=dim, N=N))
    close(ref, run(selective_scan_cpu, make_inputs(L, dim=dim, N=N)))


@needs_cc
@pytest.mark.parametrize("drop", [("D",), ("z",), ("delta_bias",), ("D", "z", "delta_bias")])
@pytest.mark.parametrize("softplus", [True, False])
def test_cpu_kernel_optional_arguments(drop, softplus):
    """Without D, z or the delta bias, and without softplus (delta then positive, as a step must be)."""
    def inputs():
        xs = make_inputs(70, dim=20)
        xs = {k: v for k, v in xs.items() if k not in drop}
        if not softplus:
            xs["delta"] = xs["delta"].detach().abs().requires_grad_()
            xs.pop("delta_bias", None)
        return xs
    xs_ref, xs_cpu = inputs(), inputs()
    for xs, fn in ((xs_ref, selective_scan_ref), (xs_cpu, selective_scan_cpu)):
        out, last = fn(**xs, delta_softplus=softplus, return_last_state=True)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        xs["_out"], xs["_last"] = out.detach(), last.detach()
    assert torch.allclose(xs_ref["_out"], xs_cpu["_out"], atol=1e-5)
    assert torch.allclose(xs_ref["_last"], xs_cpu["_last"], atol=1e-5)
    for k in xs_ref:
        if not k.startswith("_"):
            assert torch.allclose(xs_ref[k].grad, xs_cpu[k].grad, atol=1e-4, rtol=1e-4), k


@needs_cc
def test_cpu_kernel_threads_split_channels_and_sum_partials():
    """Several threads (one tile of 16 channels each) give the same result as one; dB/dC are summed partials."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(selective_scan_cpu, make_inputs(90, dim=70, N=16))
        torch.set_num_threads(3)
        assert scan_cpu._threads(70) == 3
        close(one, run(selective_scan_cpu, make_inputs(90, dim=70, N=16)), atol=1e-6, gatol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_cc
def test_cpu_kernel_bf16_and_long_steps():
    """bf16 inputs (output bf16, state fp32); and steps so long that exp(dt A) underflows to 0."""
    ref = run(selective_scan_ref, make_inputs(40, torch.bfloat16))
    fast = run(selective_scan_cpu, make_inputs(40, torch.bfloat16))
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32
    close(ref, fast, atol=2e-2, gatol=5e-2)
    big = lambda: {**make_inputs(20), "delta": (torch.linspace(-150, 150, 240).view(2, 6, 20)).requires_grad_()}
    close(run(selective_scan_ref, big()), run(selective_scan_cpu, big()), atol=1e-4, gatol=1e-4)


def test_cpu_backend_falls_back_for_grouped_B_and_without_a_compiler(tmp_path):
    """Grouped B/C take the chunked scan; with no compiler 'auto' warns once and uses the chunked scan."""
    xs = make_inputs(20, bc="grouped")
    assert torch.allclose(selective_scan_fn(**xs, delta_softplus=True, backend="auto"),
                          selective_scan_ref(**xs, delta_softplus=True), atol=1e-5)
    code = ("import warnings, torch; from dimscale.ops import resolve_backend, selective_scan_fn\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    print(resolve_backend('auto', 'cpu'), any('install a C compiler' in str(x.message) for x in w))\n"
            "try:\n    resolve_backend('cpu', 'cpu')\nexcept RuntimeError as e:\n    print('C compiler' in str(e))\n")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DIMSCALE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["chunked", "True", "True"]


def test_under_bf16_autocast_state_is_fp32():
    """Under CPU bf16 autocast the chunked scan still equals the fp32 reference on fp32 inputs."""
    xs = make_inputs(40)
    want = selective_scan_ref(**xs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan_chunked(**xs, delta_softplus=True, chunk_size=8)
    assert got.dtype == torch.float32 and torch.allclose(want, got, atol=1e-5)


def test_dispatch_on_cpu_never_needs_mamba_ssm():
    assert resolve_backend("auto", "cpu") == ("cpu" if scan_cpu.available() else "chunked")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("triton", "cpu")
    xs = make_inputs(12)
    assert torch.allclose(selective_scan_fn(**xs, backend="ref"), selective_scan_fn(**xs), atol=1e-5)


def test_bad_shapes_give_clear_errors():
    xs = make_inputs(8)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_chunked(xs["u"], xs["delta"], xs["A"][:3], xs["B"], xs["C"])


def test_causal_conv1d_is_causal_and_matches_conv1d():
    x, w, b = torch.randn(2, 5, 11), torch.randn(5, 3), torch.randn(5)
    out = causal_conv1d_ref(x, w, b, activation="silu")
    want = F.silu(F.conv1d(F.pad(x, (2, 0)), w[:, None], b, groups=5))
    assert torch.allclose(out, want, atol=1e-6)
    x2 = x.clone(); x2[..., 7:] += 1.0                     # changing the future leaves the past unchanged
    assert torch.equal(causal_conv1d_fn(x2, w, b)[..., :7], causal_conv1d_fn(x, w, b)[..., :7])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,bias", [("silu", True), (None, False)])
def test_causal_conv1d_shifted_equals_reference(layout, activation, bias):
    """The fast channels-last conv == F.conv1d, forward and backward, for (B, D, L) and (B, L, D) memory."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g) if layout == "channels_last" else torch.randn(2, 6, 9, generator=g)
    grads = []
    for fn in (causal_conv1d_ref, causal_conv1d_shifted):
        xi = x.clone().requires_grad_()
        w = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        b = torch.randn(6, generator=torch.Generator().manual_seed(2)).requires_grad_() if bias else None
        out = fn(xi.transpose(1, 2) if layout == "channels_last" else xi, w, b, activation=activation)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out.detach(), xi.grad, w.grad] + ([b.grad] if bias else []))
    for want, got in zip(*grads):
        assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
