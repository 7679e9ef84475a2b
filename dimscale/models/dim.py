"""DiM (Diffusion Mamba, arXiv 2405.14224) as in the official code tyshiwo1/DiM-DiffusionMamba @292b228.

The forward pass, top to bottom, each step with its section of docs/reference.md:
    x (B, C, H, W) --conv patch p--> tokens (B, h*w, D)                docs/reference.md §1.1
    [t_tok, y_tok, tokens] + learnable pos-emb (bilinear to h, w)      docs/reference.md §1.2.1, §1.3
    depthwise 3x3 conv; pad grid to (h+3)x(w+3) with pad tokens        docs/reference.md §1.4
    seq = [t_tok, y_tok, s0, s1, s2, grid]                             docs/reference.md §1.4
    blocks: skip fusion -> scan-order switch -> x + (1+gate) Mixer(RMSNorm(x)(1+scale)+shift)
                                                                       docs/reference.md §1.5-1.7
    un-pad, depthwise 3x3 conv, RMSNorm + final adaLN, Linear, unpatchify   docs/reference.md §1.8
Deliberate choices: the official skip-tune (upsampling configs only) scales skips by >= 0.99982, a near no-op
(docs/reference.md §1.7): it is an option (`skip_tune`, off by default) that the converted upsampling releases
switch on; FreeU, token dropout and drop-path are off in the released configs and are left out.
`mixer='attention'` swaps each Mamba for multi-head self-attention (F.scaled_dot_product_attention) on the
same skeleton; attention ignores token order, so that variant has no pad cells and no scan-order switches.
This file holds the network only: no training, data or parallelism code.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dimscale.models.layout import PAD_MODES, pad_layout, relative_permutation, scan_chain
from dimscale.models.mamba import Mamba

PREFIX = 2  # [t_tok, y_tok]
MIXERS = ("mamba", "attention")   # the choices of model.mixer


def timestep_embedding(t, dim, max_period=10000):
    """(B,) float -> (B, dim) sinusoid, cos first then sin (U-ViT/DiT; diffusers Timesteps(flip_sin_to_cos=True))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class RMSNorm(nn.Module):
    """RMSNorm (eps 1e-5, learnable weight) computed in fp32 (Mamba's rms_norm_fn with residual_in_fp32)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class Attention(nn.Module):
    """Multi-head self-attention, the matched transformer baseline mixer; heads of 64 channels when possible."""

    def __init__(self, dim):
        super().__init__()
        self.heads = dim // 64 if dim % 64 == 0 else 1
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class DiMBlock(nn.Module):
    """One block (docs/reference.md §1.6): optional U-ViT skip fusion, then
    x + (1 + gate) * Mixer(RMSNorm(x) * (1 + scale) + shift)."""

    def __init__(self, dim, mixer, has_skip, scan_backend):
        super().__init__()
        self.skip_linear = None
        if has_skip:  # docs/reference.md §1.7: one Linear(2D->D) on [x, skip] up to D=512, two DxD Linears above
            self.skip_linear = nn.Linear(2 * dim, dim) if dim <= 512 else nn.ModuleList([nn.Linear(dim, dim),
                                                                                          nn.Linear(dim, dim)])
        self.norm = RMSNorm(dim)
        self.mixer = Mamba(dim, d_state=16, d_conv=3, expand=2, scan_backend=scan_backend) if mixer == "mamba" \
            else Attention(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim ** 0.5)  # adaLN-single per-block table

    def forward(self, x, mod, perm=None, skip=None, skip_scale=None):
        """x (B, L, D) fp32 residual stream, mod (B, 3D), perm (L,) order switch, skip (B, L, D) -> (B, L, D)."""
        dtype = self.norm.weight.dtype
        if skip_scale is not None:
            skip = skip * skip_scale                                     # official skip-tune (docs/reference.md §1.7)
        if self.skip_linear is not None:
            if isinstance(self.skip_linear, nn.Linear):
                x = self.skip_linear(torch.cat([x, skip], dim=-1).to(dtype)).float()
            else:
                x = (self.skip_linear[0](x.to(dtype)) + self.skip_linear[1](skip.to(dtype))).float()
        if perm is not None:
            x = x.index_select(1, perm)
        shift, scale, gate = (self.scale_shift_table[None] + mod.view(-1, 3, x.shape[-1])).unbind(1)  # (B, D)
        h = self.norm(x) * (1 + scale[:, None].float()) + shift[:, None].float()
        return x + (1 + gate[:, None]) * self.mixer(h.to(dtype))  # note (1 + gate), official attention.py L636


class DiM(nn.Module):
    """Diffusion Mamba: forward(x (B,C,H,W), t (B,) in [0,1000], y (B,) long) -> eps (B,C,H,W)."""

    def __init__(self, in_channels=4, input_size=32, num_classes=1000, width=1536, depth=49, patch=2,
                 pad_mode="lateral", mixer="mamba", scan_backend="auto", grad_checkpointing=False, pad_len=3,
                 skip_tune=False, skip_tune_param=(0.82, 1.0)):
        super().__init__()
        if depth % 2 == 0:
            raise ValueError(f"DiM depth must be odd (block 0 + encoder half + decoder half), got {depth}")
        if input_size % patch:
            raise ValueError(f"input_size {input_size} is not divisible by the patch size {patch}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer '{mixer}' is not one of {', '.join(MIXERS)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode '{pad_mode}' is not one of {', '.join(PAD_MODES)}")
        D = width
        self.in_channels, self.patch, self.width, self.depth = in_channels, patch, width, depth
        self.num_classes, self.null_class = num_classes, num_classes
        self.pad_mode, self.mixer, self.pad_len = pad_mode, mixer, pad_len
        self.grad_checkpointing = grad_checkpointing
        self.base_grid = input_size // patch
        # tokens and conditioning (docs/reference.md §1.1-1.3)
        self.patch_embed = nn.Conv2d(in_channels, D, kernel_size=patch, stride=patch)
        self.label_emb = nn.Embedding(num_classes + 1, D)                      # class token; id num_classes = null
        self.pos_embed = nn.Parameter(torch.zeros(1, PREFIX + self.base_grid ** 2, D))
        self.t_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))  # adaLN-single timestep MLP
        self.class_emb = nn.Embedding(num_classes + 1, D)                      # adaLN-single class embedding
        self.adaln_single = nn.Linear(D, 3 * D)
        # sequence preparation (docs/reference.md §1.4)
        self.first_smoother = nn.Conv2d(D, D, 3, padding=1, groups=D)
        self.last_smoother = nn.Conv2d(D, D, 3, padding=1, groups=D)
        self.sep_tokens = nn.Parameter(torch.randn(1, pad_len, D) * 0.02)      # s_0..s_2 after [t, y]
        self.pad_token = nn.Parameter(torch.randn(1, D, pad_len) * 0.02) if mixer == "mamba" else None
        # blocks (docs/reference.md §1.5-1.7): block 0, encoder blocks 1..depth//2, decoder blocks (skips) after
        self.encoder_start, half = 1, (depth - 1) // 2
        self.skip_from = list(range(self.encoder_start, self.encoder_start + half))
        self.blocks = nn.ModuleList([DiMBlock(D, mixer, i >= depth - half, scan_backend) for i in range(depth)])
        self.chain = scan_chain(depth, self.encoder_start) if mixer == "mamba" else [0] * depth
        self.skip_scales = skip_tune_scales(half, *skip_tune_param) if skip_tune else None  # decoder order
        # head (docs/reference.md §1.8)
        self.norm_out = RMSNorm(D)
        self.proj_out_1 = nn.Linear(D, 2 * D)                                   # final adaLN from token embeddings
        self.proj_out_2 = nn.Linear(D, patch * patch * in_channels)
        self._layouts = {}
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """docs/reference.md §1.9: Linear biases 0 (except dt_proj), embeddings and timestep-MLP weights N(0, 0.02),
        mixer out_proj kaiming-uniform(a=sqrt 5) / sqrt(depth); pos-emb 0; everything else keeps its PyTorch/Mamba
        default."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in (self.t_mlp[0], self.t_mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight /= math.sqrt(self.depth)
        self.pos_embed.zero_()

    def layout(self, h, w, device):
        """Cached index tensors for a (h, w) token grid: pad cells, and each block's order switch."""
        key = (h, w, str(device))
        if key not in self._layouts:
            if torch.compiler.is_compiling():       # filling the cache inside a traced graph would recompile it
                return self._build_layout(h, w, device)
            self._layouts[key] = self._build_layout(h, w, device)
        return self._layouts[key]

    def _build_layout(self, h, w, device):
        n_front = PREFIX + self.pad_len                                        # prefix + separators never move
        front = torch.arange(n_front)
        perms, prev = [], 0
        for order in self.chain:
            rel = None
            if order != prev:
                rel = torch.cat([front, n_front + relative_permutation(h, w, prev, order, self.pad_len)])
                rel = rel.to(device)
            perms.append(rel)
            prev = order
        pads = pad_layout(h, w, self.pad_len, self.pad_mode) if self.mixer == "mamba" else None
        return perms, pads if pads is None else tuple(p.to(device) for p in pads)

    def pos_embed_for(self, h, w):
        """(1, 2 + h*w, D) pos-emb; the image part bilinearly resized when (h, w) differs from the base grid
        (docs/reference.md §1.3)."""
        if (h, w) == (self.base_grid, self.base_grid):
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, (h, w))

    def forward(self, x, t, y):
        """x (B, C, H, W), t (B,) timestep in [0, 1000], y (B,) class ids (num_classes = null) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        p, D = self.patch, self.width
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"DiM input {tuple(x.shape)}: need {self.in_channels} channels and H, W divisible by "
                             f"the patch size {p}")
        t = t.expand(B) if t.dim() == 0 else t
        if not x.is_cuda and not torch.compiler.is_compiling() and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"class ids must be in [0, {self.num_classes}] ({self.num_classes} = null class)")
        h, w = H // p, W // p
        perms, pads = self.layout(h, w, x.device)
        dtype = self.patch_embed.weight.dtype
        # conditioning (docs/reference.md §1.2): tokens, adaLN-single vector, final-layer adaLN input
        t_tok = timestep_embedding(t, D)                                             # (B, D), fed directly
        y_tok = self.label_emb(y)                                                    # (B, D)
        e = self.t_mlp(timestep_embedding(t, 256).to(dtype)) + self.class_emb(y)
        mod = self.adaln_single(F.silu(e))                                           # (B, 3D), shared by blocks
        # tokens + pos-emb, then smoother and pads (docs/reference.md §1.3, §1.4); the residual stream is fp32
        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)            # (B, h*w, D)
        seq = torch.cat([t_tok[:, None].to(tokens.dtype), y_tok[:, None], tokens], 1) + self.pos_embed_for(h, w)
        prefix, img = seq[:, :PREFIX].float(), seq[:, PREFIX:]
        img = self.first_smoother(img.transpose(1, 2).reshape(B, D, h, w)).flatten(2).transpose(1, 2).float()
        if pads is not None:
            image_pos, pad_pos, pad_id = pads
            grid = img.new_empty(B, (h + self.pad_len) * (w + self.pad_len), D)
            grid[:, image_pos] = img
            grid[:, pad_pos] = self.pad_token[0].t()[pad_id].float()                 # (n_pad, D) broadcast
            img = grid
        x = torch.cat([prefix, self.sep_tokens.float().expand(B, -1, -1), img], 1)  # (B, 5 + grid, D)
        # blocks with U-ViT long skips (docs/reference.md §1.7); the skip pushed is the whole stream after the encoder block
        skips = []
        for i, block in enumerate(self.blocks):
            skip = skips.pop() if block.skip_linear is not None else None
            scale = None
            if skip is not None and self.skip_scales is not None:
                scale = self.skip_scales[i - (self.depth - len(self.skip_scales))]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mod, perms[i], skip, scale, use_reentrant=False)
            else:
                x = block(x, mod, perms[i], skip, scale)
            if i in self.skip_from:
                skips.append(x)
        # head (docs/reference.md §1.8): the chain ends in order 0, so the grid is row-major again
        img = x[:, PREFIX + self.pad_len:]
        if pads is not None:
            img = img[:, pads[0]]                                                    # (B, h*w, D)
        img = self.last_smoother(img.to(dtype).transpose(1, 2).reshape(B, D, h, w)).flatten(2).transpose(1, 2)
        shift, scale = self.proj_out_1(F.silu(t_tok.to(dtype) + y_tok)).chunk(2, dim=1)
        img = self.norm_out(img) * (1 + scale[:, None].float()) + shift[:, None].float()
        return unpatchify(self.proj_out_2(img.to(dtype)), h, w, p, C)                # (B, C, H, W)


def skip_tune_scales(n, top=0.82, bottom=1.0):
    """Official skip-tune factors (mamba_2d.py `get_skiptune_weight` as `forward` calls it): the popped skip of
    decoder block k (0..n-1) is scaled linearly from `bottom` to bottom + (top - bottom) t_c, with t_c = 1/1000
    for every t as coded (so >= 0.99982 for the released (0.82, 1.0)); float32 like the official tensors."""
    t_c = torch.tensor(1.0, dtype=torch.float32, device="cpu") / 1000       # cpu: also under torch.device("meta")
    last = bottom + (top - bottom) * t_c
    return [float(bottom + (last - bottom) * (k / max(n - 1, 1))) for k in range(n)]


def unpatchify(tokens, h, w, p, C):
    """(B, h*w, p*p*C) row-major patch tokens -> (B, C, h*p, w*p), einsum 'nhwpqc->nchpwq' (official L748)."""
    out = tokens.reshape(-1, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(-1, C, h * p, w * p)


def resize_pos_embed(pos_embed, size):
    """(1, 2 + n*n, D) -> (1, 2 + h*w, D): bilinear (align_corners=False) on the image part, prefix rows kept."""
    n = math.isqrt(pos_embed.shape[1] - PREFIX)
    if n * n != pos_embed.shape[1] - PREFIX:
        raise ValueError(f"pos_embed with {pos_embed.shape[1] - PREFIX} image rows is not a square grid")
    img = pos_embed[:, PREFIX:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=size, mode="bilinear", align_corners=False).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :PREFIX], img.flatten(2).transpose(1, 2)], dim=1)
