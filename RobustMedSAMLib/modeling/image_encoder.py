"""SAM's ViT image encoder that also returns the early feature map read by RobustSAM's decoder.

Subclass of ``segment_anything.modeling.ImageEncoderViT``: same modules and parameter names (a plain SAM /
MedSAM ``image_encoder.*`` state dict loads unchanged). :meth:`ImageEncoder.forward` returns the neck output
and the output of the first global-attention block (block 2 of ViT-B), taken before the neck, channels-last.

Two implementations of the transformer blocks compute the same function (max abs difference ~1e-5 on
seeded ViT-B weights, see ``Testing/test_fast_encoder.py``):

* the **reference path**: segment_anything's own ``Block.forward`` (eager PyTorch, differentiable);
* the **fast path** (default on CPU): our own attention and MLP forward on the same parameters. The
  reference materialises the whole attention matrix of a global block (12 heads x 4096 x 4096 float32 =
  805 MB, three times: scores, scores + rel-pos bias, softmax), 46 MB ones for the windowed blocks and the
  4096 x 3072 MLP activation; glibc returns such blocks to the OS after each use, so every forward also
  page-faults gigabytes (REFERENCE.md section 0). The fast path instead

  - global blocks (4 of 12 in ViT-B): one ``qkv`` GEMM into a reused buffer; q, k, v of each head are
    strided views of it (no copies). Per head and chunk of query rows (``chunk_bytes``, 16 MB): the
    decomposed rel-pos bias ``rel_h[q, kh] + rel_w[q, kw]`` is written into a reused buffer and passed to
    ``F.scaled_dot_product_attention`` as ``attn_mask`` (PyTorch's fused CPU flash kernel: scores, softmax
    and ``@ v`` stay in cache). ``attention="matmul"`` (the default on PyTorch < 2.2) instead accumulates
    the scaled ``q k^T`` onto the bias with ``baddbmm_`` (GEMM with beta = 1), runs softmax in place and
    writes ``@ v`` straight into the head's columns of the token-layout output;
  - windowed blocks (8 of 12): one row of windows at a time: ``qkv`` of its real tokens only (the
    reference also multiplies the zero padding; a padded token's q/k/v is exactly the qkv bias, which is
    written instead), attention per (window, head) as above, output un-partitioned before the projection;
  - the MLP runs on chunks of ``mlp_tokens`` tokens (1024), hidden activation in a reused buffer, GELU in
    place, residuals added in place;

  All large temporaries live in one per-call scratch pool, so a ViT-B forward needs ~0.2 GB on top of
  the weights instead of ~2.5 GB, and on 2 CPU cores it runs 2-2.5x faster than segment_anything's
  eager encoder, at ~1.25x the fp32 GEMM FLOP floor (measured by ``robustmedsam bench``). It is used when
  it computes what the reference computes: the blocks are segment_anything's unmodified
  ``Block``/``Attention``/``MLPBlock`` without forward hooks (the training adapters attach hooks, so
  adapted encoders take the reference path), float32, no gradient needed, no autocast active.

* the **bf16 path** (``encoder.precision = "bf16"``, set by ``RobustMedSAMLib.precision.set_precision``;
  CPU, float32 input): the fast path with bfloat16 scratch buffers, its transformer blocks computed by
  ``encoder_bf16.block`` (split bf16 weights, rel-pos bias folded into extended queries/keys); patch
  embedding, residual stream, LayerNorm, neck and outputs stay float32. :meth:`ImageEncoder.path_for` says
  ``"fast-bf16"``. Its agreement with float32 is gated per model (``precision.GATES``).

Switch: ``encoder.fast_path = None`` (default: fast on CPU, reference elsewhere), ``True`` (fast wherever
it is exact, e.g. also on CUDA) or ``False`` (reference); the environment variable
``ROBUSTMEDSAM_ENCODER=reference`` forces the reference path process-wide. :meth:`ImageEncoder.path_for`
tells which path an input takes. The benchmark is ``robustmedsam bench`` (``RobustMedSAMLib/bench.py``).

The fast path's kernels are in ``encoder_fast.py``, its bf16 block in ``encoder_bf16.py``; this module holds
the encoder and the choice of path.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block

from . import bf16, encoder_bf16
from .encoder_fast import SDPA_FUSED, FastPathOptions, Scratch, fast_block  # noqa: F401 (SDPA_FUSED re-exported)

ENV_SWITCH = "ROBUSTMEDSAM_ENCODER"

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
                or "forward" in module.__dict__)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)  # PyTorch >= 2.4
    except TypeError:
        cpu = torch.is_autocast_cpu_enabled() if device_type == "cpu" else False
        return bool(torch.is_autocast_enabled() or cpu)


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


class ImageEncoder(ImageEncoderViT):
    """``forward(x: (B, 3, S, S)) -> (embeddings (B, 256, S/16, S/16), early (B, S/16, S/16, embed_dim))``.

    Attributes:
        fast_path: None (auto: fast path on CPU for float32), True or False; see the module docstring.
        fast_options: :class:`FastPathOptions` of the fast path.
        precision: ``"fp32"`` (default) or ``"bf16"``: compute dtype of the fast path's transformer blocks
            (see the module docstring; set through ``RobustMedSAMLib.precision.set_precision``). Inputs and
            outputs are float32 either way; the parameters stay float32.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        global_blocks = [i for i, blk in enumerate(self.blocks) if blk.window_size == 0]
        if not global_blocks:
            raise ValueError("the encoder needs at least one global-attention block")
        self.early_block = global_blocks[0]
        self.fast_path: Optional[bool] = None
        self.fast_options = FastPathOptions()
        self.precision = "fp32"

    def set_precision(self, precision: str) -> None:
        """``"fp32"`` or ``"bf16"`` (the bf16 weight copies are made on first use, and freed for fp32)."""
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"precision must be one of {tuple(COMPUTE_DTYPES)}, got {precision!r}")
        self.precision = precision
        if precision == "fp32":
            bf16.drop(self)

    # -- which path ----------------------------------------------------------------------------------
    def _blocks_are_plain(self) -> bool:
        if _global_hooks():
            return False
        for blk in self.blocks:
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not MLPBlock:
                return False
            if type(blk.norm1) is not nn.LayerNorm or type(blk.norm2) is not nn.LayerNorm:
                return False
            if type(blk.mlp.lin1) is not nn.Linear or type(blk.mlp.lin2) is not nn.Linear:
                return False
            mods = (blk, blk.attn, blk.mlp, blk.norm1, blk.norm2, blk.attn.qkv, blk.attn.proj, blk.mlp.lin1,
                    blk.mlp.lin2, blk.mlp.act)
            if any(_has_hooks(m) for m in mods):
                return False
        return True

    def path_for(self, x: torch.Tensor) -> str:
        """``"fast"``, ``"fast-bf16"`` (the fast path computing in bfloat16: ``precision == "bf16"``, CPU) or
        ``"reference"``: the path :meth:`forward` takes for input ``x``."""
        mode = self.fast_path
        if os.environ.get(ENV_SWITCH, "").strip().lower() == "reference" or mode is False:
            return "reference"
        weight = self.pos_embed if self.pos_embed is not None else self.patch_embed.proj.weight
        if mode is None and (x.device.type != "cpu" or weight.dtype != torch.float32):
            return "reference"
        if x.dtype != weight.dtype or x.device != weight.device:
            return "reference"
        if _autocast_on(x.device.type):
            return "reference"
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return "reference"
        if not self._blocks_are_plain():
            return "reference"
        if self.precision == "bf16" and x.device.type == "cpu" and x.dtype == torch.float32:
            return "fast-bf16"
        return "fast"

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        path = self.path_for(x)
        if path == "fast":
            return self.forward_fast(x)
        if path == "fast-bf16":
            return self.forward_fast(x, torch.bfloat16)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """segment_anything's eager blocks (differentiable, hook-friendly)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        early = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.early_block:
                early = x
        return self.neck(x.permute(0, 3, 1, 2)), early

    def forward_fast(self, x: torch.Tensor, compute_dtype: Optional[torch.dtype] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fast path (inference only: no autograd through the in-place ops). ``compute_dtype``:
        None (the input's dtype) or ``torch.bfloat16`` for a float32 input (the bf16 path: patch embedding,
        residual stream, LayerNorm, neck and outputs stay float32)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = x.contiguous()
        scratch = Scratch(x, compute_dtype)
        block = fast_block if scratch.dtype == x.dtype else encoder_bf16.block
        early = None
        for i, blk in enumerate(self.blocks):
            x = block(blk, x, scratch, self.fast_options)
            if i == self.early_block:
                early = x
        del scratch
        return self.neck(x.permute(0, 3, 1, 2)), early
