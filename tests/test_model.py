"""DiM backbone: layout (chain, pads, orders), zoo sizes, conditioning, any-resolution weights, backends."""
import math

import pytest
import torch

from dimscale.config import ModelConfig
from dimscale.models import MODEL_ZOO, Mamba, adapt_state_dict, build_model
from dimscale.models.dim import unpatchify
from dimscale.models.layout import SCAN_ORDERS, pad_layout, relative_permutation, scan_chain, scan_order
from dimscale.ops import scan_cpu


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    """DiM-T/2 on 3-channel 16x16 inputs, 10 classes, seeded."""
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"name": "DiM-T/2", "in_channels": 3, "input_size": 16, "num_classes": 10, **kw}))


def inputs(B=2, H=16, W=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g), torch.rand(B, generator=g) * 1000, torch.arange(B) % 10


# ---------------------------------------------------------------- layout: chain, pads, orders

def test_chain_equals_reference_doc_depth_49_and_25():
    # docs/reference.md §1.5: "0 | -2 1 -1 0 (x6 -> blocks 1..24) | -1 1 -2 0 (x6 -> blocks 25..48)"
    assert scan_chain(49) == [0] + [-2, 1, -1, 0] * 6 + [-1, 1, -2, 0] * 6
    assert scan_chain(25) == [0] + [-2, 1, -1, 0] * 3 + [-1, 1, -2, 0] * 3      # "CIFAR-S uses the same rule"
    for depth in (5, 25, 49):                                                   # mirror: skips meet their order
        chain, half = scan_chain(depth), (depth - 1) // 2
        for k in range(half):
            decoder, encoder = depth - half + k, half - k
            assert chain[decoder - 1] == chain[encoder]
        assert chain[-1] == 0


def official_relative(seq, last, cur, height):
    """The official relative_scan_pattern_transformation (flip / (h w)<->(w h) transpose) on a 1-D index list."""
    x = seq.clone()
    if last < 0 <= cur:
        x = x.flip(0)
    if (last + cur + 4) % 2 == 1:
        x = x.view(height, -1).t().flatten() if (cur + 4) % 2 == 1 else x.view(-1, height).t().flatten()
    if cur < 0 <= last:
        x = x.flip(0)
    return x


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5), (6, 2), (1, 1)])
def test_order_switches_equal_official_flip_transpose(h, w):
    for a in SCAN_ORDERS:
        for b in SCAN_ORDERS:
            seq_a = scan_order(h, w, a)                                             # grid ids in order a
            assert torch.equal(seq_a[relative_permutation(h, w, a, b)], scan_order(h, w, b))
            if h == w:  # the official code only supports square grids (height = h + 3 used for both axes)
                assert torch.equal(official_relative(seq_a, a, b, h + 3), scan_order(h, w, b))


def test_pad_fills_lateral_and_rho_pad():
    h, w = 2, 4                                                                  # padded grid 5 x 7
    fill = {}
    for mode in ("lateral", "rho_pad"):
        image_pos, pad_pos, pad_id = pad_layout(h, w, 3, mode)
        grid = torch.full((5 * 7,), -1)
        grid[pad_pos] = pad_id
        fill[mode] = grid.view(5, 7)
        assert torch.equal(image_pos, torch.tensor([0, 1, 2, 3, 7, 8, 9, 10]))
    assert fill["lateral"].tolist() == [[-1, -1, -1, -1, 0, 1, 2], [-1, -1, -1, -1, 0, 1, 2],
                                        [0] * 7, [1] * 7, [2] * 7]
    assert fill["rho_pad"].tolist() == [[-1, -1, -1, -1, 0, 1, 2], [-1, -1, -1, -1, 0, 1, 2],
                                        [0, 1, 2, 0, 1, 2, 0], [1, 2, 0, 1, 2, 0, 1], [2, 0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize("h,w", [(3, 5), (4, 4), (1, 6)])
def test_every_row_and_column_run_ends_in_three_pads(h, w):
    image_pos, _, _ = pad_layout(h, w)
    is_img = torch.zeros((h + 3) * (w + 3), dtype=torch.bool)
    is_img[image_pos] = True
    for order in SCAN_ORDERS:
        flags = is_img[scan_order(h, w, order)].int().tolist()
        runs = "".join(map(str, flags)).strip("0").split("0")
        runs = [r for r in runs if r]
        gaps = [len(g) for g in "".join(map(str, flags)).strip("0").split("1") if g]
        line = w if order in (0, -2) else h
        assert all(len(r) == line for r in runs) and len(runs) == (h if line == w else w)
        assert all(g >= 3 for g in gaps)


@pytest.mark.parametrize("h,w,mode", [(3, 5, "lateral"), (4, 4, "rho_pad"), (5, 2, "lateral")])
def test_round_trip_pad_scan_chain_unpad(h, w, mode):
    """Token ids through the model's own pad layout and every block's order switch come back row-major."""
    model = tiny(pad_mode=mode)
    perms, (image_pos, pad_pos, _) = model.layout(h, w, "cpu")
    grid = torch.full(((h + 3) * (w + 3),), -1)
    grid[image_pos] = torch.arange(h * w)
    seq = torch.cat([torch.tensor([-10, -11, -20, -21, -22]), grid])
    for perm in perms:
        if perm is not None:
            seq = seq[perm]
    assert seq[:5].tolist() == [-10, -11, -20, -21, -22]                            # prefix never reordered
    assert torch.equal(seq[5:][image_pos], torch.arange(h * w))


def test_unpatchify_inverts_patch_embedding_layout():
    """A patch conv that copies pixels (c, i, j) to channel (i*p + j)*C + c, then unpatchify, is the identity."""
    p, C, H, W = 2, 3, 6, 8
    conv = torch.nn.Conv2d(C, p * p * C, p, stride=p, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for i in range(p):
            for j in range(p):
                for c in range(C):
                    conv.weight[(i * p + j) * C + c, c, i, j] = 1.0
    x = torch.randn(2, C, H, W)
    tokens = conv(x).flatten(2).transpose(1, 2)                                     # (B, h*w, p*p*C) row-major
    assert torch.equal(unpatchify(tokens, H // p, W // p, p, C), x)


# ---------------------------------------------------------------- zoo and init

@pytest.mark.parametrize("name,channels,classes,want", [("DiM-S/2", 3, 10, 50.6e6), ("DiM-L/2", 4, 1000, 386e6),
                                                        ("DiM-H/2", 4, 1000, 862e6)])
def test_zoo_parameter_counts_without_allocating(name, channels, classes, want):
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name, in_channels=channels, num_classes=classes, input_size=32))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - want) / want < 0.01, n
    assert MODEL_ZOO[name]["patch"] == 2


def test_mixer_has_mamba_ssm_names_and_init():
    m = Mamba(64, d_conv=3)
    assert {k for k, _ in m.named_parameters()} == {"in_proj.weight", "conv1d.weight", "conv1d.bias",
                                                    "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
                                                    "A_log", "D", "out_proj.weight"}
    assert m.dt_rank == 4 and m.d_inner == 128 and m.conv1d.weight.shape == (128, 1, 3)
    assert torch.allclose(m.A_log.exp(), torch.arange(1.0, 17.0).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_model_init_follows_reference():
    model = tiny()
    assert torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))
    assert model.adaln_single.bias.abs().sum() == 0 and model.proj_out_2.weight.abs().sum() > 0   # not zero-init
    bound = 1 / math.sqrt(model.blocks[0].mixer.d_inner) / math.sqrt(model.depth)                  # kaiming/sqrt(depth)
    assert model.blocks[0].mixer.out_proj.weight.abs().max() <= bound
    assert 0.01 < model.label_emb.weight.std() < 0.03


# ---------------------------------------------------------------- forward behaviour

def test_cfg_null_class_works_and_differs():
    model = tiny().eval()
    x, t, _ = inputs()
    assert model.null_class == 10
    with torch.no_grad():
        real = model(x, t, torch.tensor([3, 3]))
        null = model(x, t, torch.full((2,), model.null_class))
    assert torch.isfinite(null).all() and not torch.allclose(real, null)
    with pytest.raises(ValueError, match="class ids"):
        model(x, t, torch.tensor([11, 0]))


def test_one_set_of_weights_runs_at_several_sizes():
    model = tiny().eval()
    with torch.no_grad():
        model.pos_embed.normal_()                                                   # make interpolation matter
        for H, W in ((16, 16), (32, 32), (24, 16), (8, 12)):
            x, t, y = inputs(1, H, W)
            out = model(x, t, y)
            assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 15, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_attention_mixer_runs_the_same_skeleton():
    mamba, attn = tiny(), tiny(mixer="attention")
    strip = lambda m: {k for k in m.state_dict() if ".mixer." not in k and k != "pad_token"}
    assert strip(mamba) == strip(attn)
    x, t, y = inputs()
    out = attn(x, t, y)
    out.square().mean().backward()
    assert out.shape == x.shape and attn.blocks[0].mixer.qkv.weight.grad is not None


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_ref_backend_weights_load_into_fast_backends_unchanged(backend):
    """Same weights, same outputs and parameter gradients through the reference and each fast CPU scan."""
    if backend == "cpu" and not scan_cpu.available():
        pytest.skip("no C compiler: the CPU kernel cannot be built here")
    ref, fast = tiny(scan_backend="ref"), tiny(scan_backend=backend)
    fast.load_state_dict(ref.state_dict())
    x, t, y = inputs(2, 16, 12)
    outs = [m(x, t, y) for m in (ref, fast)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for m, out in zip((ref, fast), outs):
        out.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_same_gradients():
    x, t, y = inputs()
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt).train()
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_close_to_fp32():
    model = tiny().eval()
    x, t, y = inputs()
    with torch.no_grad():
        want = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, t, y)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_adapt_state_dict_resizes_pos_embed_for_finetune():
    small = tiny()
    with torch.no_grad():
        small.pos_embed[:, :2] = 5.0
        small.pos_embed[:, 2:] = 1.5                                                # constant grid stays constant
    big = tiny(input_size=32)
    sd = adapt_state_dict(small.state_dict(), big)
    big.load_state_dict(sd)
    assert big.pos_embed.shape == (1, 2 + 16 * 16, 64)
    assert torch.allclose(big.pos_embed[:, :2], torch.full((1, 2, 64), 5.0))
    assert torch.allclose(big.pos_embed[:, 2:], torch.full((1, 256, 64), 1.5))
    assert small.state_dict()["pos_embed"].shape == (1, 2 + 64, 64)                 # input untouched


def test_bf16_weights_as_under_deepspeed_bf16():
    """DeepSpeed's bf16 mode casts every parameter to bf16: forward and backward still run, output is bf16."""
    model = tiny().to(torch.bfloat16)
    x, t, y = inputs()
    out = model(x.to(torch.bfloat16), t, y)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert model.blocks[0].mixer.A_log.grad is not None
