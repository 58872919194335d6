"""The encoder's bf16 fast path: transformer blocks computing in bfloat16 (``precision="bf16"``, CPU).

:func:`block` replaces ``encoder_fast.fast_block`` when the fast path's scratch buffers are bfloat16 (see
its docstring for what stays float32). Two things make it both fast and close to float32:

* **Split weights.** Each linear layer multiplies ``[x | x]`` by ``[W_hi | W_lo]`` (``W_hi = bf16(W)``,
  ``W_lo = bf16(W - W_hi)``, ``modeling/bf16.py``): the weights are carried to about 16 bits for twice the
  GEMM FLOPs. Rounding the weights themselves, the same for every token, was what changed masks most.
* **Rel-pos bias folded into the GEMM.** segment_anything's attention logits are ``scale * q.k + rel_h[q, kh]
  + rel_w[q, kw]`` (the decomposed relative-position terms of query ``q`` against key row ``kh`` and column
  ``kw``). The float32 path passes that bias as the fused kernel's mask; in bf16, writing it (a broadcast add,
  memory bound) and reading it back cost more than the attention's GEMMs. Here queries and keys are
  extended instead (``D = hd + H + W`` columns, zero-padded to a multiple of 32)::

      q' = [scale * q | rel_h[q, :] | rel_w[q, :]]      k' = [k | onehot(kh) | onehot(kw)]      v' = [v | 0]

  so that ``q'.k' = scale * q.k + rel_h[q, kh] + rel_w[q, kw]`` exactly (products accumulate in float32 in the
  kernel), and PyTorch's fused attention (flash kernel, softmax statistics in float32) runs without a mask
  with ``scale = 1``; the first ``hd`` output columns are the attention output. Measured on 1 core with AMX:
  a row of windows 10.4 -> 4.8 ms, a global head 22 -> 20 ms.

Needs PyTorch >= 2.2 (fused CPU attention); the attention helpers of ``image_encoder.py`` call
:func:`attend` for bf16 buffers and rel-pos attention.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

ALIGN = 32  # AMX / AVX512-BF16 kernels work on 32 bf16 values per row: pad the extended width to it


def augmented_width(hd: int, h: int, w: int) -> int:
    """Columns of the extended queries / keys: ``hd + h + w`` rounded up to a multiple of 32."""
    return -(-(hd + h + w) // ALIGN) * ALIGN


def key_columns(h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``(h * w, h + w)``: for key token ``(kh, kw)`` (row-major) the one-hots of ``kh`` and ``kw``."""
    eye_h = torch.eye(h, dtype=dtype, device=device)[:, None, :].expand(h, w, h)
    eye_w = torch.eye(w, dtype=dtype, device=device)[None, :, :].expand(h, w, w)
    return torch.cat([eye_h, eye_w], dim=-1).reshape(h * w, h + w)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor,
             size: Tuple[int, int], scale: float, constants: bool = True) -> None:
    """Fill the extended ``q (n, T, D)``, ``k``, ``v`` whose first ``hd`` columns hold the plain q, k, v
    (``T = h * w`` tokens of an ``h x w`` grid; ``rh (h, h, hd)``, ``rw (w, w, hd)`` from ``get_rel_pos``).
    ``constants``: also write the keys' one-hot and the zero columns (skip when the buffers still hold them)."""
    h, w = size
    n, t, _ = q.shape
    hd = rh.shape[-1]
    plain = q[..., :hd].reshape(n, h, w, hd)  # a view: splits the token dimension only
    q[..., hd:hd + h].view(n, h, w, h).copy_(torch.einsum("bhwc,hkc->bhwk", plain, rh))
    q[..., hd + h:hd + h + w].view(n, h, w, w).copy_(torch.einsum("bhwc,wkc->bhwk", plain, rw))
    q[..., :hd].mul_(scale)
    if constants:
        q[..., hd + h + w:].zero_()
        k[..., hd:hd + h + w].copy_(key_columns(h, w, k.dtype, k.device))
        k[..., hd + h + w:].zero_()
        v[..., hd:].zero_()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor,
           size: Tuple[int, int], scale: float, constants: bool = True) -> torch.Tensor:
    """``softmax(scale q k^T + rel-pos bias) v`` for the extended ``q, k, v (n, T, D)`` (plain values in the
    first ``hd`` columns, overwritten elsewhere); returns a ``(n, T, hd)`` view of the result."""
    _prepare(q, k, v, rh, rw, size, scale, constants)
    res = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]
    return res[..., :rh.shape[-1]]


def _duplicated(scratch, name: str, x: torch.Tensor) -> torch.Tensor:
    """``[x | x]`` in bf16 (one broadcast copy): the input of a GEMM on stacked split weights."""
    *lead, c = x.shape
    dup = scratch.get(name, *lead, 2 * c)
    dup.view(*lead, 2, c).copy_(x.unsqueeze(-2))
    return dup


def _add_(acc: torch.Tensor, value: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``acc += value`` for float32 ``acc`` and bf16 ``value``, through the float32 buffer ``tmp`` (a mixed-dtype
    add is 2-7x slower than a conversion copy plus a float32 add on this path's sizes)."""
    tmp.copy_(value)
    return acc.add_(tmp)


def block(blk, x: torch.Tensor, scratch, opts) -> torch.Tensor:
    """segment_anything's ``Block.forward`` on contiguous float32 ``x (B, H, W, C)`` with bf16 compute
    (``scratch`` of dtype bfloat16); returns a new float32 tensor.

    * LayerNorm (statistics and output), the residual stream and its additions: float32.
    * Every linear layer: bf16 activations times the layer's weights split into two bf16 parts
      ``W = W_hi + W_lo`` (:func:`~RobustMedSAMLib.modeling.bf16.split_params`): ``[x | x] @ [W_hi | W_lo]^T``,
      one GEMM with float32 accumulation and one rounding of its bf16 output. With plain bf16 weights (the
      same rounding for every token) the ViT-B parity case changed 0.9 % of its mask pixels, with split
      weights 0.4 % (README, Speed); they cost twice the GEMM FLOPs, which bf16 runs several times faster
      than float32 where the CPU computes it natively.
    * Attention: extended queries/keys (:func:`attend`, softmax statistics in float32 in the fused kernel);
      GELU in bf16 (computed in float32 per element).
    """
    from . import encoder_fast as fast  # the shared fast-path helpers (that module imports this one)

    B, H, W, C = x.shape
    M = B * H * W
    n1, n2 = blk.norm1, blk.norm2
    xn = _duplicated(scratch, "norm", F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps))
    if blk.window_size > 0:
        a = fast.window_attention(blk.attn, xn, blk.window_size, scratch, opts)
    else:
        qkv = fast.linear_into(xn.view(M, 2 * C), blk.attn.qkv, scratch.get("qkv", M, 3 * C))
        del xn
        a = fast.global_attention(blk.attn, qkv, (B, H, W), scratch, opts)
    proj = fast.linear_into(_duplicated(scratch, "proj_in", a), blk.attn.proj, scratch.get("proj", M, C))
    y = torch.empty(M, C, dtype=x.dtype, device=x.device).copy_(proj)  # the block's output (float32)
    y.add_(x.view(M, C))  # shortcut + attn
    mlp = blk.mlp
    gelu = type(mlp.act) is torch.nn.GELU
    step = max(1, opts.mlp_tokens_bf16)
    tmp = torch.empty(min(step, M), C, dtype=x.dtype, device=x.device)
    for i in range(0, M, step):
        n = min(step, M - i)
        yc = y[i:i + n]
        hn = _duplicated(scratch, "mlp_in", F.layer_norm(yc, n2.normalized_shape, n2.weight, n2.bias, n2.eps))
        hidden = fast.linear_into(hn, mlp.lin1, scratch.get("mlp_hidden", n, mlp.lin1.out_features))
        if gelu:
            torch._C._nn.gelu_(hidden, approximate=mlp.act.approximate)
        else:
            hidden = mlp.act(hidden)
        out = fast.linear_into(_duplicated(scratch, "mlp_dup", hidden), mlp.lin2, scratch.get("mlp_out", n, C))
        _add_(yc, out, tmp[:n])
    return y.view(B, H, W, C)
