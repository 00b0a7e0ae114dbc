"""Gated PixelCNN: an exact autoregressive model of the discrete image.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu, *Conditional Image Generation
with PixelCNN Decoders* (NeurIPS 2016). The image is factorised in raster order, and within a
pixel in channel order (R | G | B), as in eq. 1 (and section 3.4 of van den Oord et al. 2016a,
*Pixel Recurrent Neural Networks*)::

    p(x | y) = prod_i p(x_i | x_1, ..., x_{i-1}, y),

each factor a softmax over the L integer levels (``output: categorical``) or a discretized mixture
of K logistics (``output: logistic``; Salimans, Karpathy, Chen & Kingma, *PixelCNN++*, ICLR 2017,
section 2.1; nn/discretized.py), so log p(x | y) is the exact log-probability of the *discrete*
image either way. Every layer is the gated unit of eq. 2, with the label term of eq. 4::

    h_out = tanh(W_f * h + V_f^T y) ⊙ sigmoid(W_g * h + V_g^T y),

run by two stacks that together see every earlier pixel and no later one (no blind spot;
Figure 1 right, Figure 2): a *vertical* stack that sees all rows above, and a *horizontal* stack
that sees the pixels to the left in the current row, receives the vertical stack's features
shifted down one row, and has residual connections; skip connections from every horizontal layer
feed the output head. For C > 1 channels the features of the horizontal stack are split into C
groups and the kernel tap on the current pixel is masked so that group j sees input channels < j
in the first layer (mask A) and groups <= j after it (mask B).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

from genlab.models.base import GenerativeModule, bits_per_dim
from genlab.nn import discretized
from genlab.nn.discretized import Output

# Images sampled together by `PixelCNN.sample` on a CPU (`pass_size` scales it for an
# accelerator). A pass reads only a window of a row (GatedPixelCNN.row_outputs), so its size does
# not grow with the image. On 2 CPU cores (2026-12-04), samples/s in chunks of 64 / 128 / 256 /
# 500: 127 / 218 / 287 / 277 for the default net on 8x8 digits, and 23 (64) / 42 (256) / 45 (500)
# for the mnist profile's on 28x28.
SAMPLE_CHUNK = 256


def feature_groups(n: int, channels: int) -> torch.Tensor:
    """The image channel each of n features belongs to: C contiguous blocks, (n,)."""
    return torch.arange(n) * channels // n


class MaskedConv2d(nn.Conv2d):
    """A convolution over pre-padded input whose last tap (the current pixel) is channel-masked.

    The caller pads so that the bottom-right tap of the kernel lands on the current pixel; the
    other taps see earlier pixels and are not masked. On the current pixel, output feature o may
    read input feature i only if ``group(o) > group(i)`` (mask A) or ``group(o) >= group(i)``
    (mask B). Input group -1 (a constant channel) is visible to every output.
    """

    def __init__(
        self,
        in_groups: torch.Tensor,
        out_groups: torch.Tensor,
        kernel_size: tuple[int, int],
        mask_type: Literal["A", "B"],
    ) -> None:
        super().__init__(len(in_groups), len(out_groups), kernel_size)
        allowed = out_groups[:, None] > in_groups[None, :]  # (out, in)
        if mask_type == "B":
            allowed |= out_groups[:, None] == in_groups[None, :]
        mask = torch.ones_like(self.weight)  # (out, in, kh, kw)
        mask[:, :, -1, -1] = allowed.to(mask.dtype)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move features one row down (row 0 gets zeros): row r then depends only on rows < r."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]  # (B, F, H, W)


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) ⊙ sigmoid(b) of eq. 2 on the two feature halves; (B, 2F, ..) -> (B, F, ..)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks (Figure 2), with the label bias of eq. 4.

    The vertical conv is (k//2 + 1) x k with its last row on the current row, so the vertical
    features of row r see rows <= r; they reach the horizontal stack only shifted down one row.
    The horizontal conv is 1 x (k//2 + 1) ending on the current pixel (channel-masked).
    """

    def __init__(
        self,
        in_groups: torch.Tensor,
        groups: torch.Tensor,
        kernel_size: int,
        mask_type: Literal["A", "B"],
        residual: bool,
        num_classes: int | None,
        dropout: float,
        size: tuple[int, int],
    ) -> None:
        super().__init__()
        n_in, n = len(in_groups), len(groups)
        gate_groups = torch.cat([groups, groups])  # the tanh and the sigmoid halves, (2F,)
        self.k = kernel_size // 2
        self.vertical = nn.Conv2d(n_in, 2 * n, (self.k + 1, kernel_size))
        self.horizontal = MaskedConv2d(in_groups, gate_groups, (1, self.k + 1), mask_type)
        # The shifted vertical features come from rows above only: this link needs no mask.
        self.v_to_h = nn.Conv2d(2 * n, 2 * n, 1)
        self.residual = MaskedConv2d(groups, groups, (1, 1), "B") if residual else None
        self.skip = MaskedConv2d(groups, groups, (1, 1), "B")
        # Spatial dropout (whole feature maps): as good as element-wise dropout on the digits
        # and ~15% faster to train on CPU, where drawing a mask per element is slow.
        self.dropout = nn.Dropout2d(dropout)
        # V^T y of eq. 4 with a one-hot y is a lookup: one learned gate bias per class and stack.
        self.v_label = nn.Embedding(num_classes, 2 * n) if num_classes else None
        self.h_label = nn.Embedding(num_classes, 2 * n) if num_classes else None
        # A learned bias per location: eq. 5's location-dependent conditioning V * s with a
        # constant map s. Small images are far from translation invariant (digits are centred).
        self.v_position = nn.Parameter(torch.zeros(2 * n, *size))
        self.h_position = nn.Parameter(torch.zeros(2 * n, *size))

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(v, h) (B, F_in, H, W) -> (v, h, skip), each (B, F, H, W)."""
        v_pre = self.vertical_pre(v, y)
        h_out, skip = self.horizontal_out(h, self.v_to_h(down_shift(v_pre)), y)
        return self.dropout(gate(v_pre)), h_out, skip

    def vertical_pre(self, v: torch.Tensor, y: torch.Tensor | None, top: int = 0) -> torch.Tensor:
        """Pre-activation of the vertical gate, (B, 2F, H', W): row r sees input rows <= r.

        `v` holds the image's rows top .. top + H' - 1 (the position bias is taken there)."""
        k = self.k
        rows, cols = v.shape[-2:]
        v_pre = self.vertical(F.pad(v, (k, k, k, 0)))  # (B, 2F, H', W)
        v_pre = v_pre + self.v_position[:, top : top + rows, :cols]
        if y is not None:
            v_pre = v_pre + self.v_label(y)[:, :, None, None]  # (B, 2F, 1, 1), broadcast
        return v_pre

    def horizontal_out(
        self,
        h: torch.Tensor,
        link: torch.Tensor,
        y: torch.Tensor | None,
        top: int = 0,
        left: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_out, skip), each (B, F, H', W'), of the horizontal stack on the image's rows
        top .. top + H' - 1 and columns left .. left + W' - 1. `link` (B, 2F, H', W') is the
        vertical stack's contribution there: v_to_h of the vertical gate's whole pre-activation
        (biases included) one row up."""
        k = self.k
        rows, cols = h.shape[-2:]
        h_pre = self.horizontal(F.pad(h, (k, 0, 0, 0))) + link
        h_pre = h_pre + self.h_position[:, top : top + rows, left : left + cols]
        if y is not None:
            h_pre = h_pre + self.h_label(y)[:, :, None, None]
        h_gated = self.dropout(gate(h_pre))  # (B, F, H', W')
        h_out = h_gated if self.residual is None else h + self.residual(h_gated)
        return h_out, self.skip(h_gated)


class GatedPixelCNN(nn.Module):
    """Scaled image (B, C, H, W) in [-1, 1] -> logits (B, L, C, H, W) of p(x_i | x_<i, y).

    The head gives each pixel and channel either L logits (categorical) or the 3K parameters of a
    discretized logistic mixture; `forward` turns both into L normalised-or-not logits, and
    `log_likelihood` scores the observed levels without expanding the mixture to all L of them
    (nn/discretized.py).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        levels: int,
        channels: int,
        num_layers: int,
        kernel_size: int,
        num_classes: int | None,
        dropout: float,
        output: Output = "categorical",
        mixtures: int = 5,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_channels, self.levels, self.output = c, levels, output
        self.head_size = levels if output == "categorical" else 3 * mixtures  # per channel
        # Input: the C image channels plus a constant-ones channel (group -1, visible to every
        # output), so that zero padding differs from the mid level 0.0 near the borders.
        in_groups = torch.cat([torch.arange(c), torch.tensor([-1])])
        groups = feature_groups(channels, c)
        self.layers = nn.ModuleList(
            GatedLayer(
                in_groups if i == 0 else groups,
                groups,
                kernel_size,
                "A" if i == 0 else "B",
                # No residual in the first layer (its input is the image, not the stack's
                # features) nor in the last (only its skip reaches the head).
                0 < i < num_layers - 1,
                num_classes,
                dropout,
                (h, w),
            )
            for i in range(num_layers)
        )
        out_groups = torch.arange(c).repeat_interleave(self.head_size)  # feature c·P + p -> c
        # ELU rather than the paper's ReLU: a dead ReLU would make some x_j -> x_i gradients
        # exactly zero, and the causality tests read the receptive field off exact zeros.
        self.head = nn.Sequential(
            nn.ELU(),
            MaskedConv2d(groups, groups, (1, 1), "B"),
            nn.ELU(),
            nn.Dropout2d(dropout),
            MaskedConv2d(groups, out_groups, (1, 1), "B"),
        )

    @staticmethod
    def _with_ones(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C + 1, H, W): the image and the constant-ones channel."""
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)

    def _head(self, skips: torch.Tensor) -> torch.Tensor:
        """Summed skips (B, F, H', W') -> the head's output (B, C, P, H', W')."""
        b, _, h, w = skips.shape
        return self.head(skips).view(b, self.image_channels, self.head_size, h, w)

    def logits_of(self, out: torch.Tensor) -> torch.Tensor:
        """The head's output (B, C, P, H', W') -> logits (B, L, C, H', W')."""
        if self.output == "categorical":
            return out.transpose(1, 2)
        return discretized.level_log_probs(out, self.levels)

    def _skips(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        v = h_stack = self._with_ones(x)  # (B, C + 1, H, W)
        skips = 0
        for layer in self.layers:
            v, h_stack, skip = layer(v, h_stack, y)
            skips = skips + skip
        return skips  # (B, F, H, W)

    def outputs(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The head's output at every pixel, (B, C, P, H, W): L logits or 3K mixture params."""
        return self._head(self._skips(x, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits_of(self.outputs(x, y))  # (B, L, C, H, W)

    def log_likelihood(
        self, x: torch.Tensor, levels: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x_i | x_<i, y) of the observed levels (B, C, H, W) of the scaled image x."""
        out = self.outputs(x, y)  # (B, C, P, H, W)
        if self.output == "categorical":
            return -F.cross_entropy(self.logits_of(out), levels.long(), reduction="none")
        # Only the observed level's mass: expanding to all L would cost L times the memory.
        return discretized.observed_log_probs(out, levels, self.levels)

    # -- sampling, one row at a time -------------------------------------------------------------
    # Ancestral sampling needs the logits of one pixel per pass. The vertical stack's part of them
    # depends only on the rows above, fixed while a row is drawn: `links` computes it once per row
    # and `row_outputs` runs only the horizontal stack, on the row's pixels left of the current one
    # that can reach it. Both read a window that covers each stack's receptive field: an output
    # depends on inputs at most `reach` = sum of the layers' k rows up (vertical) or columns left
    # (horizontal) away, plus one row for the vertical stack's down shift, so the window's
    # zero-padded border (where the whole image has pixels) cannot reach it. tests check the logits
    # against `forward` at every pixel. On 28x28 MNIST (2 cores) this samples 45 images/s where
    # passing rows 0..r whole sampled 0.5, and 287 where it sampled 31 on the 8x8 digits.
    @property
    def reach(self) -> int:
        return sum(layer.k for layer in self.layers)

    def links(self, x: torch.Tensor, y: torch.Tensor | None, row: int) -> list[torch.Tensor]:
        """Each layer's link for `row`, [(B, 2F, 1, W)]: from the scaled image's rows above it
        (x (B, C, H, W); rows >= row are not read)."""
        b, _, _, w = x.shape
        if row == 0:  # down_shift gives the first row zeros
            zeros = x.new_zeros(b, self.layers[0].v_to_h.in_channels, 1, w)
            return [layer.v_to_h(zeros) for layer in self.layers]
        top = max(0, row - 1 - self.reach)
        v = self._with_ones(x[:, :, top:row])  # (B, C + 1, row - top, W)
        links = []
        for layer in self.layers:
            v_pre = layer.vertical_pre(v, y, top)  # (B, 2F, row - top, W)
            links.append(layer.v_to_h(v_pre[:, :, -1:]))
            v = layer.dropout(gate(v_pre))
        return links

    def row_outputs(
        self,
        x: torch.Tensor,
        links: list[torch.Tensor],
        y: torch.Tensor | None,
        row: int,
        col: int,
    ) -> torch.Tensor:
        """The head's output (B, C, P) at pixel (row, col) from the scaled image x (B, C, H, W),
        its pixels after (row, col) not read, and `links(x, y, row)`."""
        left = max(0, col - self.reach)
        h = self._with_ones(x[:, :, row : row + 1, left : col + 1])  # (B, C + 1, 1, W')
        skips = 0
        for layer, link in zip(self.layers, links, strict=True):
            h, skip = layer.horizontal_out(h, link[..., left : col + 1], y, row, left)
            skips = skips + skip
        return self._head(skips[..., -1:])[..., 0, 0]  # the head is 1x1: the last pixel only


class PixelCNN(GenerativeModule):
    likelihood = "exact"
    has_latent = False
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 20, "batch_size": 32}

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int,
        channels: Annotated[int, Ge(1)] = 64,  # features per stack (split into C groups)
        num_layers: Annotated[int, Ge(1)] = 6,  # gated layers; the first one uses mask A
        kernel_size: Annotated[int, Ge(3)] = 3,  # odd width of each layer's receptive field
        dropout: Annotated[float, Ge(0), Lt(1)] = 0.1,  # spatial dropout on gated features
        conditional: bool = False,  # model p(x | y) instead of p(x)
        # Each pixel's distribution over the L levels: a free softmax (L outputs), or PixelCNN++'s
        # discretized mixture of `mixtures` logistics (3K outputs), whose ordered bins share
        # strength between neighbouring levels (their choice for CIFAR-10). On MNIST at the mnist
        # profile's 600 steps the two tied: validation 1.177 against 1.180 bits/dim.
        output: Output = "categorical",
        mixtures: Annotated[int, Ge(1)] = 5,  # K logistics per pixel and channel (logistic only)
        lr: Annotated[float, Gt(0)] = 3e-3,  # peak AdamW learning rate, cosine decay to 0
        weight_decay: Annotated[float, Ge(0)] = 0.0,  # AdamW decoupled weight decay
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        self.save_hyperparameters(logger=False)  # genlab logs the resolved config itself
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if channels < image_shape[0]:
            raise ValueError(f"channels ({channels}) must be >= image channels ({image_shape[0]})")
        self.net = GatedPixelCNN(
            self.image_shape,
            levels,
            channels,
            num_layers,
            kernel_size,
            num_classes if conditional else None,
            dropout,
            output,
            mixtures,
        )

    # -- network inputs -------------------------------------------------------------------------
    # Levels enter as floats in [-1, 1], not as a learned embedding: they are ordered
    # intensities, and a one-hot input scored ~1 nat/image worse on the digits.
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels (B, C, H, W) -> floats in [-1, 1], (B, C, H, W)."""
        return x.float() / (self.levels - 1) * 2 - 1

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every conditional p(x_i | x_<i, y), (B, L, C, H, W)."""
        return self.net(self._scale(x), y)

    # -- objective ------------------------------------------------------------------------------
    def nll(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x | y) = -sum_i log p(x_i | x_<i, y) in nats per image (eq. 1), (B,)."""
        return -self.net.log_likelihood(self._scale(x), x, y).flatten(1).sum(1)

    # -- contract -------------------------------------------------------------------------------
    def log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1
    ) -> torch.Tensor:
        """Exact log P(x | y) of the discrete image in nats, (B,); `samples` is unused."""
        return -self.nll(x.to(self.device), self.labels_for(y))

    @property
    def nfe_per_sample(self) -> float:
        return float(self.dims)  # one network pass per pixel and channel

    @torch.no_grad()
    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Ancestral sampling: one network pass per pixel and channel, raster then channel order,
        for chunks of the n images in turn (each from `generator` where the last one stopped)."""
        y = self.labels_for(y)
        chunk = self.pass_size(SAMPLE_CHUNK)
        parts = [
            self._sample(min(chunk, n - i), None if y is None else y[i : i + chunk], generator)
            for i in range(0, n, chunk)
        ]
        return torch.cat(parts) if parts else self._sample(0, y, generator)

    def _sample(
        self, n: int, y: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        c, h, w = self.image_shape
        x = torch.zeros(n, c, h, w, dtype=torch.long, device=self.device)
        scaled = self._scale(x)  # kept in step with x
        for row in range(h):
            links = self.net.links(scaled, y, row)
            for col in range(w):
                for ch in range(c):
                    out = self.net.row_outputs(scaled, links, y, row, col)  # (n, C, P)
                    x[:, ch, row, col] = self.draw(out[:, ch], generator)
                    scaled[:, ch, row, col] = self._scale(x[:, ch, row, col])
        return x.to(torch.uint8)  # (n, C, H, W)

    def draw(self, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One level per image (n,) from the head's output for one pixel and channel (n, P)."""
        if self.net.output == "categorical":
            return self.sample_categorical(out, generator)
        out = out[:, :, None, None]  # (n, 3K, 1, 1)
        uniform = lambda shape: self.rand(*shape, generator=generator)  # noqa: E731
        return discretized.sample(out, self.levels, uniform)[:, 0, 0]

    # -- system ---------------------------------------------------------------------------------
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = self.nll(x, self.labels_for(y)).mean()
        self.log_train({"train/loss": loss, "train/bpd": bits_per_dim(loss, self.dims)})
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimiser = torch.optim.AdamW(
            self.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            fused=True,
        )
        # Cosine decay to 0 over the whole run, stepped per batch.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
