"""torch.compile: the CPU scan custom ops pass opcheck; a compiled tiny DiM equals eager with zero graph breaks."""
import time

import pytest
import torch

from dimscale.config import ConfigError, ModelConfig, RunConfig, validate
from dimscale.models import build_model, compile_model
from dimscale.ops import scan_cpu

needs_cc = pytest.mark.skipif(not scan_cpu.available(), reason="no C compiler: the CPU kernel cannot be built")
pytestmark = pytest.mark.usefixtures("one_thread")


@needs_cc
def test_cpu_scan_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    batch, L, D, N = 2, 9, 5, 4                  # kernel layouts: (B, L, D), A (N, D), B/C (B, L, N)
    args = [r(batch, L, D), r(batch, L, D), -r(N, D).abs() - 0.1, r(batch, L, N), r(batch, L, N), r(D), r(batch, L, D),
            r(D), True, 4]
    torch.library.opcheck(scan_cpu.scan_cpu_fwd, [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                                                  for a in args])
    out, states = scan_cpu.scan_cpu_fwd(*args)
    torch.library.opcheck(scan_cpu.scan_cpu_bwd, [*args[:8], states, torch.randn_like(out),
                                                  torch.randn_like(states[:, -1]), True, 4])
    no_opt = [*args[:5], None, None, None, False, 4]                           # without D, z, bias, softplus
    torch.library.opcheck(scan_cpu.scan_cpu_fwd, no_opt)


def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(name="DiM-T/2", in_channels=3, input_size=8, num_classes=10, compile=True)
    return cfg, build_model(cfg)


def loss(model, x, t, y):
    out = model(x, t, y)
    return out, (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def fwd_bwd(model, x, t, y):
    model.zero_grad(set_to_none=True)
    out, value = loss(model, x, t, y)
    value.backward()                             # compiled models: AOTAutograd's compiled backward graph
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


@needs_cc
def test_compiled_dim_equals_eager_with_zero_graph_breaks():
    cfg, model = tiny()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 1000, torch.tensor([3, 10])
    want = fwd_bwd(model, x, t, y)
    _, model = tiny()                          # the same weights, nothing cached yet: the first trace builds all
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(model, x, t, y)   # the forward the backward is derived from
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    start = time.perf_counter()
    # aot_eager: dynamo + AOTAutograd (fake impls, the custom ops' autograd, the backward graph) without
    # inductor's C++ codegen, which takes minutes on 2 shared cores (tools/bench.py compile runs inductor)
    assert compile_model(model, cfg, backend="aot_eager") is model     # in place: the same module and keys
    got = fwd_bwd(model, x, t, y)
    print(f"compile + first step: {time.perf_counter() - start:.1f}s")
    assert model._compiled_call_impl is not None
    for w, c in zip(want, got):
        torch.testing.assert_close(c, w, atol=1e-5, rtol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):         # new values, same shapes: no recompile
        fwd_bwd(model, x.flip(0), t.flip(0), y.flip(0))


def test_compile_option_is_validated():
    assert ModelConfig().compile is False
    cfg = RunConfig(model=ModelConfig(name="DiM-T/2", in_channels=3, compile=True, scan_backend="chunked"))
    with pytest.raises(ConfigError, match="model.compile"):
        validate(cfg)
    cfg.model.scan_backend = "triton"
    validate(cfg)
    _, model = tiny()
    assert compile_model(model, ModelConfig(compile=False)) is model and model._compiled_call_impl is None
