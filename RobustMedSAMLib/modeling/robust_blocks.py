"""RobustSAM's anti-degradation modules (AMFG and AOTG), with the official parameter names.

Attribute names, shapes and forward semantics follow RobustSAM at GitHub HEAD (6f0e263), so that the
published ``mask_decoder.*`` weights load unchanged (see shared/REFERENCE.md section 1.3):

* ``FeatureBlock`` = the three AMFG blocks (``fourier_first_layer_features``, ``fourier_last_layer_features``,
  ``fourier_mask_features``): in robust mode ``DNCBlock -> FGMBlock -> 3x3 conv``, then a resampling head
  that always runs.
* ``TokenBlock`` = AOTG: instance-normalises an output token twice and maps its first 64-dim chunk to a
  256-dim token for the robust hypernetwork MLP.

Batch normalisation (``SelectiveConv.BN``) has three behaviours, chosen by :func:`set_batchnorm_mode`:

* ``"running"`` (default at inference, ``model.eval()``): the stored running statistics;
* ``"per_sample"``: every sample is normalised with its own statistics. This is what the official
  ``eval.py`` scripts do (they never call ``model.eval()``, and the decoder always sees a batch of one), so
  it reproduces published numbers; results do not depend on how prompts are batched;
* training (``module.training``): per-sample statistics as in the official training (a decoder call per
  image), and the running statistics are updated once per sample in batch order, exactly as that many
  consecutive official calls would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segment_anything.modeling.common import LayerNorm2d

from . import bf16

BATCHNORM_MODES = ("running", "per_sample")


class SampleBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` (same state dict) whose batch statistics are taken per sample (see module doc)."""

    mode = "running"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.mode == "running":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                n = x.shape[2] * x.shape[3]
                mean = x.mean(dim=(2, 3))  # (B, C)
                var = x.var(dim=(2, 3), unbiased=False) * (n / max(n - 1, 1))
                for b in range(x.shape[0]):
                    self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean[b])
                    self.running_var.mul_(1 - self.momentum).add_(self.momentum * var[b])
                self.num_batches_tracked.add_(x.shape[0])
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def set_batchnorm_mode(module: nn.Module, mode: str) -> None:
    """Set the inference behaviour of every :class:`SampleBatchNorm2d` inside ``module``."""
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm mode must be one of {BATCHNORM_MODES}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, SampleBatchNorm2d):
            m.mode = mode


class Selector(nn.Module):
    """Spatial attention over two branches: 4x4 pooled descriptor -> two logits maps -> softmax."""

    def __init__(self, channel: int, reduction: int = 16) -> None:
        super().__init__()
        self.spatial_attention = 4
        self.in_channel = channel * self.spatial_attention ** 2
        self.avg_pool = nn.AdaptiveAvgPool2d((self.spatial_attention, self.spatial_attention))
        hidden = self.in_channel // reduction
        self.fc = nn.Sequential(nn.Linear(self.in_channel, hidden, bias=False), nn.ReLU(inplace=True))
        self.att_conv1 = nn.Linear(hidden, self.in_channel)
        self.att_conv2 = nn.Linear(hidden, self.in_channel)

    def forward(self, x: torch.Tensor):
        """``(B, C, H, W)`` -> two ``(B, C, H, W)`` attention maps (softmax over the pair)."""
        b, c, h, w = x.shape
        att = self.cells(x)
        # Nearest upsampling of the 4x4 attention to the feature size (each cell covers h/4 x w/4 pixels).
        att = F.interpolate(att.flatten(0, 1), scale_factor=(h / self.spatial_attention, w / self.spatial_attention),
                            mode="nearest").view(2, b, c, h, w)
        return att[0], att[1]

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """The attention per cell of the 4 x 4 grid: ``(2, B, C, 4, 4)``."""
        b, c = x.shape[:2]
        s = self.spatial_attention
        y = self.fc(self.avg_pool(x).reshape(b, -1))
        return torch.softmax(torch.stack((self.att_conv1(y), self.att_conv2(y))).view(2, b, c, s, s), dim=0)

    def mix(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a * att1 + b * att2`` with the attention of ``x`` (``a``, ``b``, ``x``: ``(B, C, H, W)``).

        When 4 divides H and W, nearest upsampling just repeats each cell over an ``H/4 x W/4`` block, so the
        cells are broadcast over a block view instead of materialising two full-size maps (same numbers).
        """
        n, c, h, w = x.shape
        s = self.spatial_attention
        if h % s or w % s:
            att1, att2 = self(x)
            return a * att1 + b * att2
        att = self.cells(x).view(2, n, c, s, 1, s, 1)
        blocks = (n, c, s, h // s, s, w // s)
        return (a.view(blocks) * att[0] + b.view(blocks) * att[1]).view(n, c, h, w)


class SelectiveConv(nn.Module):
    """Two 3x3 conv branches (batch-norm and instance-norm fed) mixed by a :class:`Selector`."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.selector = Selector(channels, reduction=reduction)
        self.BN = SampleBatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = bf16.conv(self.conv1, F.leaky_relu(self.BN(x), 0.01))
        out2 = bf16.conv(self.conv2, F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.01))
        return self.selector.mix(out1 + out2, out1, out2)


class SKDown(nn.Module):
    """Holder kept for the official key path ``SEMBlock.maxpool_conv.0.*``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(SelectiveConv(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class CABlock(nn.Module):
    """Squeeze-and-excitation channel attention (reduction 16)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = nn.Sequential(
            nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * self.excitation(self.squeeze(x).view(b, c)).view(b, c, 1, 1)


class DNCBlock(nn.Module):
    """Degradation-normalising block: ``CA(concat(x, SelectiveConv(x)))``, C -> 2C channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel_attention = CABlock(2 * channels)
        self.SEMBlock = SKDown(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_attention(torch.cat([x, self.SEMBlock(x)], dim=1))


class FGMBlock(nn.Module):
    """Fourier block: a 1x1 conv on the FFT magnitude; phase kept; real part of the inverse FFT.

    Computed on the half spectrum (``rfft2``/``irfft2``): the magnitude of a real signal's spectrum is
    symmetric (``|F(-k)| = |F(k)|``) and a 1x1 conv acts on each frequency separately, so the new spectrum
    keeps Hermitian symmetry and the official ``real(ifft2(...))`` equals ``irfft2`` of its half. The phase
    factor ``F / |F|`` (1 where ``F = 0``, as ``angle(0) = 0``) replaces ``cos(angle), sin(angle)``, so the new
    spectrum is ``F * (conv(|F|) / |F|)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft2(x, dim=(-2, -1))
        magnitude = spectrum.abs()
        modified = bf16.conv(self.conv_layer, magnitude)
        zero = magnitude == 0
        if bool(zero.any()):  # angle(0) = 0: there the new spectrum is the (real) new magnitude
            spectrum = torch.where(zero, torch.ones_like(spectrum), spectrum)
            magnitude = torch.where(zero, torch.ones_like(magnitude), magnitude)
        return torch.fft.irfft2(spectrum * (modified / magnitude), s=x.shape[-2:], dim=(-2, -1))


class FeatureBlock(nn.Module):
    """One AMFG block. ``head`` is ``"upsample"`` (x4, to ``transformer_dim // 8`` channels) or
    ``"downsample"`` (same size, the mask-feature block); the attribute names follow the official code."""

    def __init__(self, channels: int, transformer_dim: int, head: str) -> None:
        super().__init__()
        self.dnc_block_combined = DNCBlock(channels)
        self.fgm_block = FGMBlock(channels)
        self.conv_layer = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)
        out = transformer_dim // 8
        if head == "upsample":
            self.upsample_layer = nn.Sequential(
                nn.ConvTranspose2d(channels, transformer_dim, kernel_size=2, stride=2),
                LayerNorm2d(transformer_dim), nn.GELU(),
                nn.ConvTranspose2d(transformer_dim, out, kernel_size=2, stride=2))
        elif head == "downsample":
            self.downsample_layer = nn.Sequential(
                nn.Conv2d(channels, 2 * channels, 3, 1, 1), LayerNorm2d(2 * channels), nn.GELU(),
                nn.Conv2d(2 * channels, channels, 3, 1, 1))
        else:
            raise ValueError(head)
        self.head = head

    def forward(self, x: torch.Tensor, robust: bool = True) -> torch.Tensor:
        if robust:
            x = bf16.conv(self.conv_layer, self.fgm_block(self.dnc_block_combined(x)))
        return _sequential(self.upsample_layer if self.head == "upsample" else self.downsample_layer, x)

    def projected(self, x: torch.Tensor, hyper: torch.Tensor, robust: bool = True) -> torch.Tensor:
        """``hyper @ forward(x)`` per pixel, for a "downsample" block: ``x (B, c, H, W)``, ``hyper (B, K, c)`` ->
        ``(B, K, H, W)``.

        The head's last layer is a 3x3 conv (2c -> c) followed only by this projection, so both fold into one
        2c -> K conv per sample (weights ``hyper @ W``, bias ``hyper @ b``): the same numbers as projecting
        the full output, without computing its c channels. That conv is computed as one GEMM of its 9 taps
        (``(K*9, 2c) @ (2c, H*W)``) and 9 shifted adds: a conv with K = 1 output channels is a poor shape for
        the convolution kernels (about 10x slower for these sizes).
        """
        if robust:
            x = bf16.conv(self.conv_layer, self.fgm_block(self.dnc_block_combined(x)))
        last = self.downsample_layer[-1]
        g = _sequential(self.downsample_layer[:-1], x)
        b, k, _ = hyper.shape
        ci, kh, kw = last.weight.shape[1:]
        weight = torch.einsum("bkc,cihw->bkhwi", hyper, last.weight).reshape(b, k * kh * kw, ci)
        h, w = g.shape[-2:]
        taps = torch.bmm(weight, g.reshape(b, ci, h * w)).view(b, k, kh, kw, h, w)
        out = (hyper @ last.bias)[..., None, None].expand(b, k, h, w).contiguous()
        return _add_shifted_taps(out, taps, last.padding)


def _sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, with the convolutions marked for bf16 compute run through :func:`bf16.conv`."""
    for layer in layers:
        x = bf16.conv(layer, x) if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) else layer(x)
    return x


def _add_shifted_taps(out: torch.Tensor, taps: torch.Tensor, padding) -> torch.Tensor:
    """``out[..., y, x] += sum_{i, j} taps[..., i, j, y + i - ph, x + j - pw]`` (zero outside): the sum of a
    stride-1 conv's per-tap products. ``out (B, K, H, W)``, ``taps (B, K, kh, kw, H, W)``."""
    kh, kw, h, w = taps.shape[-4:]
    ph, pw = padding
    for i in range(kh):
        dy = i - ph
        ys_out, ys_in = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
        for j in range(kw):
            dx = j - pw
            xs_out, xs_in = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
            out[..., ys_out, xs_out] += taps[:, :, i, j, ys_in, xs_in]
    return out


class TokenBlock(nn.Module):
    """AOTG: ``(B, D)`` output tokens -> ``(B, D)`` robust tokens.

    The official block instance-normalises the tokens twice, reshapes each D-dim token into
    ``num_chunks`` chunks of ``D / num_chunks`` and maps every chunk to D dims. Only the first chunk's result
    is ever used by the official single-mask output (and training), so that is what this returns; the
    official multi-prompt/multimask shapes are a bug (shared/REFERENCE.md section 1.3).
    """

    def __init__(self, num_chunks: int, chunk_dim: int) -> None:
        super().__init__()
        self.num_chunks = num_chunks
        self.chunk_dim = chunk_dim
        self.mlp = nn.Sequential(nn.Linear(chunk_dim, chunk_dim), nn.ReLU(),
                                 nn.Linear(chunk_dim, chunk_dim * num_chunks))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # The official InstanceNorm1d receives a 2-D (B, D) tensor, i.e. normalises each token over D.
        x = tokens.unsqueeze(0)
        x = F.instance_norm(F.instance_norm(x, eps=1e-5), eps=1e-5).squeeze(0)
        return self.mlp(x[:, : self.chunk_dim])


def count_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.state_dict().values())
