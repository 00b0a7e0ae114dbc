"""The discretized mixture of logistics over L integer levels (PixelCNN's and the VAE's decoder).

Salimans, Karpathy, Chen & Kingma, *PixelCNN++* (ICLR 2017), section 2.1: each pixel and channel
gets K logistics on the [-1, 1] scale of the levels, and level l the mass of its bin of width
2/(L-1) around its centre, the first and last bins reaching -inf and +inf so that the L masses sum
to 1. Against a free softmax over L levels it needs 3K outputs instead of L, and neighbouring
levels share what they learn. Both families use it identically, hence here (DESIGN.md, layout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

# A decoder's distribution over the L levels of a pixel and channel: a free softmax (L outputs) or
# the discretized logistic mixture (3K outputs).
Output = Literal["categorical", "logistic"]

# PixelCNN++'s floor on a logistic's log-scale (its code's -7): below it a bin of width 2/255
# already holds all the mass, and a smaller scale only makes the gradients stiff.
MIN_LOG_SCALE = -7.0

# `mode` builds the (images, L, C, K, H, W) table this many entries at a time: 64M floats, so a
# few of its intermediates stay within a GiB or two (a 3x64x64 image at 256 levels and K = 5 has
# 15.7M entries, so it goes 4 images at a time).
MODE_TABLE_ENTRIES = 64 * 2**20


def log_mass(
    params: torch.Tensor, value: torch.Tensor, levels: int, bottom: torch.Tensor, top: torch.Tensor
) -> torch.Tensor:
    """log P(level) under the mixture (PixelCNN++ eq. 2).

    params (..., 3K, H, W) holds the mixture logits, means and log-scales; `value` is the level's
    centre on [-1, 1], broadcastable to (..., 1, H, W), and `bottom`/`top` (likewise) mark the
    first and last level. Returns (..., H, W).

    With a = (v + d - mu)/s and b = (v - d - mu)/s (d half a bin), the bin's mass is
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))): three logs that each
    stay finite in float32, however far the bin lies in a tail, where the difference of two
    sigmoids would round to 0.
    """
    logit, mu, log_s = params.unflatten(-3, (3, -1)).unbind(-4)  # each (..., K, H, W)
    inv_s = torch.exp(-log_s.clamp(min=MIN_LOG_SCALE))
    half = 1.0 / (levels - 1)  # half a bin: the L centres are 2/(L-1) apart on [-1, 1]
    centred = value - mu
    a = (centred + half) * inv_s
    b = (centred - half) * inv_s
    width = 2 * half * inv_s  # a - b > 0
    # log(1 - exp(-w)) = log(-expm1(-w)): exact for the narrow bins of a wide logistic too.
    inner = torch.log(-torch.expm1(-width))
    per_component = (
        torch.where(top, 0.0, F.logsigmoid(a))
        + torch.where(bottom, 0.0, F.logsigmoid(-b))
        + torch.where(bottom | top, 0.0, inner)
    )
    return torch.logsumexp(per_component + logit.log_softmax(dim=-3), dim=-3)


def observed_log_probs(params: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """log P(x) of the observed integer levels x (B, C, H, W) under params (B, C, 3K, H, W),
    (B, C, H, W); only their bins, so the cost does not grow with L."""
    level = x.unsqueeze(2)  # (B, C, 1, H, W)
    centre = level.float() / (levels - 1) * 2 - 1
    return log_mass(params, centre, levels, level == 0, level == levels - 1)


def level_log_probs(params: torch.Tensor, levels: int) -> torch.Tensor:
    """Every level's log-probability (normalised logits) from params (B, C, 3K, H, W),
    (B, L, C, H, W): L times the work and memory of `observed_log_probs` (`sample` and `mode`
    avoid building it for many images at once)."""
    level = torch.arange(levels, device=params.device).view(-1, 1, 1, 1, 1)  # (L, 1, 1, 1, 1)
    centre = level.to(params.dtype) / (levels - 1) * 2 - 1
    # (B, 1, C, 3K, H, W) against (L, 1, 1, 1, 1) -> (B, L, C, H, W)
    return log_mass(params.unsqueeze(1), centre, levels, level == 0, level == levels - 1)


def sample(
    params: torch.Tensor, levels: int, uniform: Callable[[torch.Size], torch.Tensor]
) -> torch.Tensor:
    """Integer levels (..., H, W) drawn from params (..., 3K, H, W); `uniform(shape)` gives
    U[0, 1) draws (a seeded generator's).

    PixelCNN++'s sampler, with no table over the L levels (which costs L times the memory): a
    component by the Gumbel-max trick, a continuous draw mu + s (log u - log(1 - u)) from its
    logistic, rounded to the nearest level's centre. The bins partition the line (the edge bins
    reach -inf and +inf, so the clamp), hence each level is drawn with exactly its mass.
    """
    logit, mu, log_s = params.unflatten(-3, (3, -1)).unbind(-4)  # each (..., K, H, W)
    gumbel = -torch.log(-torch.log(uniform(logit.shape).clamp(min=1e-20)))
    k = (logit + gumbel).argmax(dim=-3, keepdim=True)  # (..., 1, H, W)
    mu_k = mu.gather(-3, k).squeeze(-3)  # (..., H, W)
    s_k = log_s.gather(-3, k).squeeze(-3).clamp(min=MIN_LOG_SCALE).exp()
    u = uniform(mu_k.shape)  # u = 0 gives -inf: the first level, after the clamp
    v = mu_k + s_k * (torch.log(u) - torch.log1p(-u))
    return torch.round((v + 1) / 2 * (levels - 1)).clamp(0, levels - 1).long()


def mode(params: torch.Tensor, levels: int) -> torch.Tensor:
    """The most probable level (B, C, H, W) under params (B, C, 3K, H, W), from the table of
    `level_log_probs` built a few images at a time so that its memory stays bounded."""
    per_image = levels * params[0].numel() // 3  # table entries of one image, over K components
    chunk = max(1, MODE_TABLE_ENTRIES // per_image)
    parts = [level_log_probs(p, levels).argmax(dim=1) for p in params.split(chunk)]
    return torch.cat(parts) if parts else params.new_zeros(0, dtype=torch.long)
