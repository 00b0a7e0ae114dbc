"""The U-Net of the diffusion and flow-matching families (both use it identically).

Ho, Jain & Abbeel, *Denoising Diffusion Probabilistic Models* (NeurIPS 2020), appendix B: a
PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm, the time step fed through a
Transformer sinusoidal embedding and added inside every block. Diffusion feeds it the integer step
t in 1..T and reads eps_theta(x_t, t); flow matching feeds it t in [0, 1] and reads the velocity
v_theta(x_t, t). Either way the embedding sees the time on a 0..1000 scale (`timesteps` is the
largest time the network is given: T for diffusion, 1 for flow matching).

Moved here from models/diffusion.py when flow matching needed it: the module and parameter names
are unchanged, so diffusion checkpoints load as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer position encoding of the timestep (Vaswani et al. 2017, sec. 3.5), (B,) ->
    (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the (time + class) embedding added in between (Ho et al.
    appendix B, after the Wide ResNet block)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """eps_theta(x_t, t, y) or v_theta(x_t, t, y): (B, C, H, W), (B,), (B,) or None ->
    (B, C, H, W). t may be fractional; `timesteps` is its largest value (see the module).

    Resolutions halve while above 4, exactly while even and rounded up once odd and above 8
    (8 -> 4; 28 -> 14 -> 7; 32 -> 16 -> 8 -> 4; 62 -> 31 -> 16 -> 8 -> 4), the width doubles per
    level up to 4x `channels`; skips join the down and up paths at each level, the up path
    resampled to each skip's size.
    `num_labels` > 0 adds a class embedding to the time embedding (the last label is the null
    class of classifier-free guidance).
    """

    def __init__(
        self,
        image_channels: int,
        image_size: int,
        channels: int,
        blocks_per_level: int,
        num_labels: int,
        timesteps: int,
        dropout: float,
    ) -> None:
        super().__init__()
        # The embedding sees t on a 0..1000 scale whatever the time range (0..T or 0..1).
        self.time_scale = 1000 / timesteps
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_labels, emb_dim) if num_labels > 0 else None
        widths = [channels]
        size = image_size
        while size > 4 and (size % 2 == 0 or size > 8):
            size = (size + 1) // 2  # what the stride-2 convolution below gives
            widths.append(channels * min(2 ** len(widths), 4))
        self.channels = channels
        self.stem = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = channels
        for i, w in enumerate(widths):
            blocks = [
                ResBlock(prev if j == 0 else w, w, emb_dim, dropout)
                for j in range(blocks_per_level)
            ]
            self.down.append(nn.ModuleList(blocks))
            prev = w
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(prev, prev, emb_dim, dropout) for _ in range(2)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = [
                ResBlock(prev + w if j == 0 else w, w, emb_dim, dropout)
                for j in range(blocks_per_level)
            ]
            self.up.append(nn.ModuleList(blocks))
            prev = w
            if i > 0:
                self.upsample.append(nn.Conv2d(w, widths[i - 1], 3, padding=1))
                prev = widths[i - 1]
        self.out_norm = group_norm(channels)
        self.out = nn.Conv2d(channels, image_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t * self.time_scale, self.channels))  # (B, E)
        if self.label_emb is not None and y is not None:
            emb = emb + self.label_emb(y)
        h = self.stem(x)  # (B, ch, H, W)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # (B, w, H/2, W/2)
        for block in self.mid:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, prev + w, h, w)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                # (B, w, 2h, 2w), one less on a side that halved rounding up
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
                h = self.upsample[i](h)
        return self.out(F.silu(self.out_norm(h)))
