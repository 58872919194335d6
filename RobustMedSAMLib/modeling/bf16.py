"""bfloat16 compute helpers of the CPU bf16 path (``precision="bf16"``, see ``RobustMedSAMLib/precision.py``).

Written for the CPU instead of autocast: autocast casts every weight on every call (on ViT-B that overhead
ate the whole gain, REFERENCE.md / issue 13), whereas here each layer's weights are cast once and cached.

* :func:`params`: a layer's ``(weight, bias)`` as bfloat16 copies, cached on the layer (outside its state
  dict) and rebuilt when a parameter changes (another Parameter object, new storage or an in-place update
  that bumps its version), so ``load_state_dict`` (also ``assign=True``), ``.to(device)`` and optimizer steps
  after switching precision are safe; writes through ``param.data`` are not seen (call :func:`drop`).
* :func:`conv`: a ``Conv2d`` / ``ConvTranspose2d`` of a float32 input computed in bfloat16 (oneDNN: AMX or
  AVX512-BF16 kernels, float32 accumulation) with a float32 result, used by the robust decoder's blocks
  where the layer carries ``bf16 = True`` (set by :func:`set_modules`); other layers run unchanged.

The parameters themselves stay float32: training, checkpoints and the float32 path are unaffected.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.bfloat16
_PACK = "_bf16_pack"  # attribute in the module's __dict__ (not a parameter or buffer: not in the state dict)
_SPLIT = "_bf16_split"


def _marks(tensors) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, t.device) for t in tensors)


class _Stamp:
    """What a cached copy was made from: each tensor (a weak reference: the same Parameter object), its storage
    address, version counter and device. The object identity matters: address and version alone matched a new
    parameter that the allocator had placed where a freed one had been (``load_state_dict(..., assign=True)``
    twice: the second state dict's tensors landed in the first one's freed blocks in 2 of 20 tries here).
    Not seen: in-place writes through ``param.data`` (they bypass the version counter); call :func:`drop`."""

    __slots__ = ("refs", "marks", "extra")

    def __init__(self, tensors, extra=None) -> None:
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.marks = _marks(tensors)
        self.extra = extra

    def fits(self, tensors, extra=None) -> bool:
        if extra != self.extra or _marks(tensors) != self.marks:
            return False
        return all((r is None) if t is None else (r is not None and r() is t) for r, t in zip(self.refs, tensors))


def params(layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of ``layer`` as cached bfloat16 tensors (bias None if the layer has none)."""
    tensors = (layer.weight, layer.bias)
    pack = layer.__dict__.get(_PACK)
    if pack is None or not pack[0].fits(tensors):
        stamp = _Stamp(tensors)
        with torch.no_grad():
            cast = tuple(None if t is None else t.detach().to(DTYPE) for t in tensors)
        pack = (stamp, cast)
        layer.__dict__[_PACK] = pack
    return pack[1]  # type: ignore[return-value]


def split_params(layer: nn.Module, stacked: bool = True):
    """``(weight, bias)`` for a doubled input ``[x | x]``: ``weight = [W_hi | W_lo]`` ``(out, 2 * in)`` in bfloat16
    with ``W_hi = bf16(W)`` and ``W_lo = bf16(W - W_hi)``, so that ``[x | x] @ weight^T = x @ (W_hi + W_lo)^T``
    carries the weights to about 16 bits (bf16 alone: 8) in one GEMM (float32 accumulation, one rounding of
    the output). The attention's qkv weights need it: their bf16 rounding, the same for every token, moves
    the attention logits coherently and was the largest single cause of mask changes (issue 13 notes)."""
    tensors = (layer.weight, layer.bias)
    pack = layer.__dict__.get(_SPLIT)
    if pack is None or not pack[0].fits(tensors, stacked):
        stamp = _Stamp(tensors, stacked)
        with torch.no_grad():
            w = layer.weight.detach()
            o, i = w.shape[0], w[0].numel()
            if stacked:
                both = torch.empty(o, 2 * i, dtype=DTYPE, device=w.device)
                _split_into(w.reshape(o, i), both[:, :i], both[:, i:])
                weight = both
            else:
                hi, lo = torch.empty_like(w, dtype=DTYPE), torch.empty_like(w, dtype=DTYPE)
                _split_into(w.reshape(o, i), hi.view(o, i), lo.view(o, i))
                weight = (hi, lo)
            bias = None if layer.bias is None else layer.bias.detach().to(DTYPE)
            pack = (stamp, (weight, bias))
        layer.__dict__[_SPLIT] = pack
    return pack[1]


def _split_into(w: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, rows: int = 256) -> None:
    """``hi = bf16(w)``, ``lo = bf16(w - hi)`` for a 2-D float32 ``w``, a block of rows at a time (the
    float32 remainder stays in cache: about twice as fast as whole-tensor ops when a model is set up)."""
    rest = torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=w.dtype, device=w.device)
    for a in range(0, w.shape[0], rows):
        b = min(w.shape[0], a + rows)
        hi[a:b].copy_(w[a:b])
        r = rest[:b - a]
        r.copy_(hi[a:b])
        torch.sub(w[a:b], r, out=r)
        lo[a:b].copy_(r)


def drop(module: nn.Module) -> None:
    """Free the cached bfloat16 copies of ``module`` and its submodules."""
    for m in module.modules():
        m.__dict__.pop(_PACK, None)
        m.__dict__.pop(_SPLIT, None)


def usable(x: torch.Tensor) -> bool:
    """True where the bf16 path applies to input ``x``: float32 on the CPU, no gradient wanted."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)


def conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a ``Conv2d`` / ``ConvTranspose2d``: in bfloat16 if ``layer.bf16`` is set and
    :func:`usable`, returning float32; else the layer's own forward."""
    if not getattr(layer, "bf16", False) or not usable(x) or layer.weight.requires_grad and torch.is_grad_enabled():
        return layer(x)
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return layer(x)
    xb = x.to(DTYPE)
    if layer.bf16 == "split":  # weights to ~16 bits: conv(x, W_hi) + conv(x, W_lo), summed in float32
        weight, bias = split_params(layer, stacked=False)
        hi, lo = weight
        return _conv(layer, xb, hi, bias).float().add_(_conv(layer, xb, lo, None))
    weight, bias = params(layer)
    return _conv(layer, xb, weight, bias).float()


def _conv(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                                  layer.dilation)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def set_modules(modules: Iterable[nn.Module], enabled) -> int:
    """Mark the convolutions among ``modules`` for bf16 compute (``enabled``: True, or ``"split"`` for weights
    carried to ~16 bits as two bf16 parts, :func:`split_params`) or back to float32 (False); returns how many
    were marked. Unmarking also frees their cached bf16 weights."""
    n = 0
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if enabled:
                m.bf16 = enabled
                n += 1
            else:
                for name in ("bf16", _PACK, _SPLIT):
                    m.__dict__.pop(name, None)
    return n
