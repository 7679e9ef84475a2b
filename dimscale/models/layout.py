"""Token layout of DiM: the padded 2-D grid, the 4 scan orders, the per-block order chain (docs/reference.md §1.4-1.5).

Pure index math on LongTensors, for any grid (h, w), square or not. A padded grid has (h+P) x (w+P) cells,
numbered row-major ("grid index" i*(w+P)+j); P = d_conv = 3 pad cells close every row and every column, so
Mamba's causal conv (width 3) never mixes the end of one row/column with the start of the next.
"""
from __future__ import annotations

import torch

SCAN_ORDERS = (0, -2, 1, -1)  # row-major, reversed row-major, column-major, reversed column-major (docs/reference.md §1.5)
PAD_MODES = ("lateral", "rho_pad")  # the choices of model.pad_mode


def scan_chain(depth: int, encoder_start: int = 1) -> list[int]:
    """Scan order of every block: blocks before `encoder_start` use 0, the encoder half cycles forward through
    SCAN_ORDERS, the middle block steps back one, the decoder cycles backward, the last block is 0 (docs/reference.md §1.5,
    official `_init_scan_patterns`). Mirrored, so each skip arrives in the order of the stream it joins."""
    if depth < 1 or encoder_start < 0 or encoder_start >= depth:
        raise ValueError(f"scan_chain: need depth >= 1 and 0 <= encoder_start < depth, got {depth}, {encoder_start}")
    mid = encoder_start + (depth - encoder_start) // 2
    chain, k = [], 0
    for layer in range(depth):
        if layer < encoder_start or layer == depth - 1:
            k = 0
        elif layer < mid:
            k = (k + 1) % 4
        elif layer == mid:
            k = (k - 1) % 4 if (depth - encoder_start) % 2 == 0 else k
        else:
            k = (k - 1) % 4
        chain.append(SCAN_ORDERS[k])
    return chain


def scan_order(h: int, w: int, order: int, pad: int = 3) -> torch.Tensor:
    """(Hp*Wp,) grid indices of the padded grid in the sequence order `order` (Hp, Wp = h+pad, w+pad)."""
    Hp, Wp = h + pad, w + pad
    grid = torch.arange(Hp * Wp).view(Hp, Wp)
    if order == 0:
        return grid.flatten()
    if order == -2:
        return grid.flatten().flip(0)
    if order == 1:
        return grid.t().flatten()
    if order == -1:
        return grid.t().flatten().flip(0)
    raise ValueError(f"scan order {order} is not one of {SCAN_ORDERS}")


def relative_permutation(h: int, w: int, src: int, dst: int, pad: int = 3) -> torch.Tensor:
    """Index `idx` with x_dst = x_src[idx] for a grid sequence stored in order `src`, wanted in order `dst`."""
    src_idx = scan_order(h, w, src, pad)
    where = torch.empty_like(src_idx)
    where[src_idx] = torch.arange(src_idx.numel())                  # grid index -> position in the src sequence
    return where[scan_order(h, w, dst, pad)]


def pad_layout(h: int, w: int, pad: int = 3, mode: str = "lateral"):
    """(image_pos (h*w,), pad_pos (n_pad,), pad_id (n_pad,)): grid indices of the image tokens (row-major),
    of the pad cells (row-major), and which of the `pad` learnable pad tokens fills each pad cell.
    'lateral': column w+k and row h+k hold pad k (bottom rows span the corner too; official `lateral_token_pad`).
    'rho_pad': pad cells take p0, p1, ..., p_{pad-1}, p0, ... cyclically in row-major order
    (official `adaptive_fill_pad_into_sequence`); the right columns equal 'lateral', the bottom rows differ."""
    Hp, Wp = h + pad, w + pad
    i, j = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    is_pad = ((i >= h) | (j >= w)).flatten()
    # a stable sort instead of boolean indexing: same cells in row-major order, no data-dependent shapes
    # (traceable by torch.compile without a graph break)
    cells = torch.argsort(is_pad.to(torch.uint8), stable=True)
    image_pos, pad_pos = cells[:h * w], cells[h * w:]
    if mode == "lateral":
        pi, pj = i.flatten()[pad_pos], j.flatten()[pad_pos]
        pad_id = torch.where(pi >= h, pi - h, pj - w)
    elif mode == "rho_pad":
        pad_id = torch.arange(pad_pos.numel()) % pad
    else:
        raise ValueError(f"pad_mode '{mode}' is not one of {', '.join(PAD_MODES)}")
    return image_pos, pad_pos, pad_id
