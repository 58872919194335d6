"""The fast path of the image encoder: segment_anything's ``Block.forward`` recomputed with reused buffers.

:func:`fast_block` computes one transformer block (global or windowed attention, then the MLP) on the same
parameters as segment_anything's ``Block``, writing its large temporaries into a :class:`Scratch` pool; the
design and the measurements are in :mod:`RobustMedSAMLib.modeling.image_encoder`, which decides when this path
is used. Tokens are channels-last: ``x (B, H, W, C)``. The bf16 variant of the block is ``encoder_bf16.block``,
which shares :func:`linear_into`, :func:`global_attention` and :func:`window_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos

from . import bf16, encoder_bf16


def _torch_version() -> Tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - unusual version strings
        return (2, 0)


# PyTorch >= 2.2 has a fused (flash) CPU kernel for scaled_dot_product_attention with a float attn_mask
# and the ``scale`` argument (2.1); older versions would fall back to the unfused math kernel.
SDPA_FUSED = _torch_version() >= (2, 2)


@dataclass
class FastPathOptions:
    """Tuning of the fast path (results do not depend on them beyond float rounding).

    attention: "sdpa" (PyTorch's fused flash kernel, bias as ``attn_mask``; default on PyTorch >= 2.2, see
        ``SDPA_FUSED``) or "matmul" (``baddbmm_`` onto the bias + in-place softmax + ``bmm``).
    chunk_bytes: size budget of one block of attention scores / bias (query rows per chunk follow).
    mlp_tokens: tokens per MLP chunk (hidden activation ``mlp_tokens x 4C`` floats).
    mlp_tokens_bf16: the same on the bf16 path: bf16 GEMMs of 1024 rows ran on one of 2 threads only (oneDNN's
        partitioning of a 1024 x 768 output), 2048 rows on both.
    """

    attention: str = "sdpa" if SDPA_FUSED else "matmul"
    chunk_bytes: int = 16 << 20
    mlp_tokens: int = 1024
    mlp_tokens_bf16: int = 2048

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "matmul"):
            raise ValueError(f"attention must be 'sdpa' or 'matmul', got {self.attention!r}")
        if self.attention == "sdpa" and not SDPA_FUSED:
            raise ValueError("attention='sdpa' needs PyTorch >= 2.2 (fused CPU kernel, scale argument)")
        if self.chunk_bytes < 1 or self.mlp_tokens < 1 or self.mlp_tokens_bf16 < 1:
            raise ValueError("chunk_bytes, mlp_tokens and mlp_tokens_bf16 must be positive")


class Scratch:
    """Named flat buffers reused across the blocks of one forward (no repeated multi-MB allocations), all of
    the compute dtype ``dtype`` (float32, or bfloat16 on the bf16 path)."""

    def __init__(self, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
        self.dtype, self.device = dtype or like.dtype, like.device
        self._buffers: Dict[str, torch.Tensor] = {}

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(name, None)
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel].view(*shape)


def _params(layer: nn.Module, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of ``layer`` in the compute dtype: the parameters themselves for float32, else their
    cached bfloat16 copies (:func:`~RobustMedSAMLib.modeling.bf16.params`)."""
    if dtype == layer.weight.dtype:
        return layer.weight, layer.bias
    return bf16.params(layer)


def linear_into(x2d: torch.Tensor, layer: nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """``out = x2d @ W^T + b`` (exactly ``F.linear``'s addmm) into a preallocated ``out`` (of the compute
    dtype: the layer's bf16 weights are used for a bf16 ``out``)."""
    if out.dtype != layer.weight.dtype and x2d.shape[1] == 2 * layer.in_features:
        weight, bias = bf16.split_params(layer)  # doubled input [x | x]: bf16 weights that sum to the float32 ones
    else:
        weight, bias = _params(layer, out.dtype)
    if bias is None:
        return torch.mm(x2d, weight.t(), out=out)
    return torch.addmm(bias, x2d, weight.t(), out=out)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, has_bias: bool, scale: float,
            opts: FastPathOptions, out: torch.Tensor) -> None:
    """``out = softmax(scale * q k^T + bias) v`` for q ``(n, L, hd)``, k, v ``(n, S, hd)`` (any strides with a
    contiguous last dimension). ``scores (n, L, S)`` holds the bias if ``has_bias`` and is overwritten."""
    if opts.attention == "sdpa":
        res = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=scores[None] if has_bias else None,
                                             scale=scale)
        out.copy_(res[0])
        return
    kt = k.transpose(-2, -1)
    if has_bias:
        scores.baddbmm_(q, kt, alpha=scale)
    else:
        torch.baddbmm(scores, q, kt, beta=0.0, alpha=scale, out=scores)
    torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    torch.bmm(scores, v, out=out)  # strided ``out`` (a head's columns of the token layout) is fine for BLAS


def _rel_pos(size: int, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """segment_anything's ``get_rel_pos(size, size, table)`` in the compute dtype."""
    rel = get_rel_pos(size, size, table)
    return rel if rel.dtype == dtype else rel.to(dtype)


def _extended(scratch: Scratch, opts: FastPathOptions, attn: Attention) -> bool:
    """Whether attention folds the rel-pos bias into extended queries/keys (``encoder_bf16.py``): bf16 compute,
    rel-pos attention, the fused kernel."""
    return attn.use_rel_pos and scratch.dtype == torch.bfloat16 and opts.attention == "sdpa"


def global_attention(attn: Attention, qkv: torch.Tensor, size: Tuple[int, int, int], scratch: Scratch,
                      opts: FastPathOptions) -> torch.Tensor:
    """Attention over all H*W tokens; ``qkv (B*H*W, 3C)``; returns the pre-projection output (B*H*W, C).

    Works on q, k, v as strided views of ``qkv`` (no per-head copies); one head and a chunk of query rows at a
    time, so the only large temporary is one ``rows*W x H*W`` block of scores (``opts.chunk_bytes``).
    """
    B, H, W = size
    C = qkv.shape[1] // 3
    nh = attn.num_heads
    hd, N = C // nh, H * W
    heads = qkv.view(B, N, 3, nh, hd)
    out = scratch.get("attn_out", B, N, nh, hd)
    rows = max(1, min(H, opts.chunk_bytes // (scratch.itemsize * W * N)))
    extended = _extended(scratch, opts, attn)
    rh = _rel_pos(H, attn.rel_pos_h, scratch.dtype) if attn.use_rel_pos else None
    rw = _rel_pos(W, attn.rel_pos_w, scratch.dtype) if attn.use_rel_pos else None
    if extended:  # bf16: rel-pos bias folded into the GEMM (encoder_bf16.py)
        ext = scratch.get("extended", 3, 1, N, encoder_bf16.augmented_width(hd, H, W))
        first = True
        for b in range(B):
            for h in range(nh):
                for j in range(3):
                    ext[j, 0, :, :hd].copy_(heads[b, :, j, h])
                out[b, :, h].copy_(encoder_bf16.attend(ext[0], ext[1], ext[2], rh, rw, (H, W), attn.scale,
                                                       constants=first)[0])
                first = False
        return out.view(B * N, C)
    for b in range(B):
        for h in range(nh):
            q, k, v = heads[b, :, 0, h], heads[b, :, 1, h], heads[b, :, 2, h]  # (N, hd), row stride 3C
            if rh is not None:  # add_decomposed_rel_pos's einsums, for one head
                r_q = q.reshape(H, W, hd)
                rel_h = torch.einsum("hwc,hkc->hwk", r_q, rh)
                rel_w = torch.einsum("hwc,wkc->hwk", r_q, rw)
            for y0 in range(0, H, rows):
                r = min(rows, H - y0)
                i0, i1 = y0 * W, (y0 + r) * W
                scores = scratch.get("scores", 1, r * W, N)
                if rh is not None:
                    torch.add(rel_h[y0:y0 + r, :, :, None], rel_w[y0:y0 + r, :, None, :], out=scores.view(r, W, H, W))
                _attend(q[None, i0:i1], k[None], v[None], scores, rh is not None, attn.scale, opts,
                        out[b, i0:i1, h][None])
    return out.view(B * N, C)


def _splits(size: int, ws: int, nblocks: int):
    """Positions ``0..size-1`` grouped as (window slice, within-window slice, position slice): the full
    windows, then the partial last window if ``size`` is not a multiple of ``ws``."""
    full = min(size // ws, nblocks)
    out = []
    if full:
        out.append((slice(0, full), slice(0, ws), slice(0, full * ws)))
    if full < nblocks and size > full * ws:
        out.append((slice(full, full + 1), slice(0, size - full * ws), slice(full * ws, size)))
    return out


def _window_copy(windows: torch.Tensor, image: torch.Tensor, ws: int, to_windows: bool) -> None:
    """Copy between ``windows`` laid out ``(nbh, ws, nbw, ws, ...)`` and the real ``(h, w, ...)`` pixels
    ``image`` (``h <= nbh*ws``, ``w <= nbw*ws``; the rest of ``windows`` is padding, left alone)."""
    nbh, nbw = windows.shape[0], windows.shape[2]
    h, w = image.shape[0], image.shape[1]
    tail = image.shape[2:]
    for bi, ri, ys in _splits(h, ws, nbh):
        for bj, rj, xs in _splits(w, ws, nbw):
            win = windows[bi, ri, bj, rj]
            img = image[ys, xs].view(*win.shape[:4], *tail)  # splitting dims of a slice is always a view
            if to_windows:
                win.copy_(img)
            else:
                img.copy_(win)


def window_attention(attn: Attention, xn: torch.Tensor, ws: int, scratch: Scratch,
                      opts: FastPathOptions) -> torch.Tensor:
    """Attention inside ``ws x ws`` windows of the normalised tokens ``xn (B, H, W, C)``, with
    segment_anything's zero padding to a multiple of ``ws``. A few rows of windows at a time: ``qkv`` of
    their real tokens only (a zero-padded token's q, k, v is exactly the qkv bias, which is written
    instead), then attention per (window, head). Returns the pre-projection output (B*H*W, C).

    On the bf16 path ``xn`` is ``(B, H, W, 2C)``: the normalised tokens twice, for the split qkv weights."""
    B, H, W, width_in = xn.shape
    C = attn.qkv.out_features // 3
    nh = attn.num_heads
    hd, T = C // nh, ws * ws
    ph, pw = (ws - H % ws) % ws, (ws - W % ws) % ws
    nbh, nbw = (H + ph) // ws, (W + pw) // ws
    out = scratch.get("attn_out", B, H, W, nh, hd)
    pad_value = None
    if ph or pw:
        low = scratch.dtype != torch.float32
        qkv_bias = bf16.split_params(attn.qkv)[1] if low else _params(attn.qkv, scratch.dtype)[1]
        pad_value = qkv_bias.view(3, nh, hd) if qkv_bias is not None else xn.new_zeros(3, nh, hd)
    extended = _extended(scratch, opts, attn)
    rh = _rel_pos(ws, attn.rel_pos_h, scratch.dtype) if attn.use_rel_pos else None
    rw = _rel_pos(ws, attn.rel_pos_w, scratch.dtype) if attn.use_rel_pos else None
    per_row = nbw * nh  # (window, head) pairs in one row of windows
    rows = max(1, min(nbh, opts.chunk_bytes // (scratch.itemsize * per_row * T * T)))
    width = encoder_bf16.augmented_width(hd, ws, ws) if extended else hd
    for b in range(B):
        for i0 in range(0, nbh, rows):
            r = min(rows, nbh - i0)
            n = r * per_row
            y0, y1 = i0 * ws, min((i0 + r) * ws, H)
            qkv = linear_into(xn[b, y0:y1].reshape(-1, width_in), attn.qkv, scratch.get("qkv", (y1 - y0) * W, 3 * C))
            src = qkv.view(y1 - y0, W, 3, nh, hd)
            # (3, r, nbw, nh, ws, ws, hd), seen as pixels (r, ws, nbw, ws, 3, nh, hd); with extended queries and
            # keys (bf16) the plain values are the first hd of D columns
            if extended:
                full = scratch.get("heads", 3, r, nbw, nh, ws, ws, width)
                heads = full[..., :hd]
            else:
                heads = scratch.get("heads", 3, r, nbw, nh, ws, ws, hd)
            pix = heads.permute(1, 4, 2, 5, 0, 3, 6)
            if pad_value is not None:
                if ph and i0 + r == nbh:
                    pix[r - 1, ws - ph:] = pad_value
                if pw:
                    pix[:, :, nbw - 1, ws - pw:] = pad_value
            _window_copy(pix, src, ws, to_windows=True)
            if extended:
                q, k, v = full.view(3, n, T, width).unbind(0)
                res = encoder_bf16.attend(q, k, v, rh, rw, (ws, ws), attn.scale)
                _window_copy(res.view(r, nbw, nh, ws, ws, hd).permute(0, 3, 1, 4, 2, 5), out[b, y0:y1], ws,
                             to_windows=False)
                continue
            q, k, v = heads.view(3, n, T, hd).unbind(0)
            scores = scratch.get("scores", n, T, T)
            if rh is not None:  # add_decomposed_rel_pos's einsums
                r_q = q.reshape(n, ws, ws, hd)
                rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
                rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
                torch.add(rel_h[:, :, :, :, None], rel_w[:, :, :, None, :], out=scores.view(n, ws, ws, ws, ws))
            res = scratch.get("window_out", n, T, hd)
            _attend(q, k, v, scores, rh is not None, attn.scale, opts, res)
            # (r, nbw, nh, ws, ws, hd) -> pixels (r, ws, nbw, ws, nh, hd)
            _window_copy(res.view(r, nbw, nh, ws, ws, hd).permute(0, 3, 1, 4, 2, 5), out[b, y0:y1], ws,
                         to_windows=False)
    return out.view(B * H * W, C)


def fast_block(blk: Block, x: torch.Tensor, scratch: Scratch, opts: FastPathOptions) -> torch.Tensor:
    """``Block.forward`` of segment_anything on contiguous ``x (B, H, W, C)``; returns a new tensor."""
    B, H, W, C = x.shape
    M = B * H * W
    n1, n2 = blk.norm1, blk.norm2
    xn = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
    if blk.window_size > 0:
        a = window_attention(blk.attn, xn, blk.window_size, scratch, opts)
    else:
        qkv = linear_into(xn.view(M, C), blk.attn.qkv, scratch.get("qkv", M, 3 * C))
        del xn
        a = global_attention(blk.attn, qkv, (B, H, W), scratch, opts)
    y = F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias)  # becomes the block's output
    y.add_(x.view(M, C))  # shortcut + attn
    mlp = blk.mlp
    gelu = type(mlp.act) is nn.GELU
    step = max(1, opts.mlp_tokens)
    for i in range(0, M, step):
        n = min(step, M - i)
        yc = y[i:i + n]
        hn = F.layer_norm(yc, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
        hidden = linear_into(hn, mlp.lin1, scratch.get("mlp_hidden", n, mlp.lin1.out_features))
        if gelu:
            torch._C._nn.gelu_(hidden, approximate=mlp.act.approximate)
        else:
            hidden = mlp.act(hidden)
        yc.add_(linear_into(hidden, mlp.lin2, scratch.get("mlp_out", n, C)))
    return y.view(B, H, W, C)
