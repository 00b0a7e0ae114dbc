"""Gated PixelCNN: an exact autoregressive model of the discrete image.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu, *Conditional Image Generation
with PixelCNN Decoders* (NeurIPS 2016). The image is factorised in raster order, and within a
pixel in channel order (R | G | B), as in eq. 1 of van den Oord et al. (2016a)::

    p(x) = prod_i p(x_i | x_1, ..., x_{i-1}),

each factor a softmax over the L integer levels, so log p(x) is the exact log-probability of the
*discrete* image. Every layer is the gated unit of eq. 2 (eq. 4 with a class label y)::

    h_out = tanh(W_f * h + V_f^T y) ⊙ sigmoid(W_g * h + V_g^T y),

run by two stacks that together see every earlier pixel (no blind spot, Figure 1 right, Figure 2):
a *vertical* stack that sees all rows above, and a *horizontal* stack that sees the pixels to the
left in the current row, receives the vertical stack's features shifted down one row, and has
residual connections; skip connections from every horizontal layer feed the output head. For
C > 1 channels the features of the horizontal stack are split into C groups and the tap on the
current pixel is masked so group j sees input channels < j in the first layer (mask A) and
groups <= j after it (mask B) (van den Oord et al. 2016a, section 3.4).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import nn

from genlab.models.base import GenerativeModule, bits_per_dim


def feature_groups(n: int, channels: int) -> torch.Tensor:
    """Which image channel each of n features belongs to: C contiguous blocks, (n,)."""
    return torch.arange(n) * channels // n


class MaskedConv2d(nn.Conv2d):
    """A convolution over unpadded input whose last tap (the current pixel) is channel-masked.

    The caller pads the input so that the bottom-right tap of the kernel lands on the current
    pixel. On that tap, output feature o may read input feature i only if
    ``group(o) > group(i)`` (mask A) or ``group(o) >= group(i)`` (mask B); the other taps see
    earlier pixels and are not masked. Input group -1 (a constant channel) is visible to all.
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
    """Move features one row down (row 0 gets zeros): row r then sees only rows < r."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]  # (B, F, H, W)


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) ⊙ sigmoid(b) on the two halves of the features (eq. 2); (B, 2F, …) -> (B, F, …)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks (Figure 2), with the label bias of eq. 4.

    The vertical conv is (k//2 + 1) x k with its last row on the current row: the vertical
    features of row r see rows <= r, and reach the horizontal stack only shifted down one row.
    The horizontal conv is 1 x (k//2 + 1) ending on the current pixel (channel-masked).
    """

    def __init__(
        self,
        in_groups: torch.Tensor,
        groups: torch.Tensor,
        kernel_size: int,
        mask_type: Literal["A", "B"],
        num_classes: int | None,
        dropout: float,
        size: tuple[int, int],
    ) -> None:
        super().__init__()
        n_in, n = len(in_groups), len(groups)
        gate_groups = torch.cat([groups, groups])  # the tanh and sigmoid halves, (2F,)
        self.k = kernel_size // 2
        self.vertical = nn.Conv2d(n_in, 2 * n, (self.k + 1, kernel_size))
        self.horizontal = MaskedConv2d(in_groups, gate_groups, (1, self.k + 1), mask_type)
        # The vertical features come from rows above only, so this link needs no mask.
        self.v_to_h = nn.Conv2d(2 * n, 2 * n, 1)
        self.residual = MaskedConv2d(groups, groups, (1, 1), "B") if mask_type == "B" else None
        self.skip = MaskedConv2d(groups, groups, (1, 1), "B")
        self.dropout = nn.Dropout(dropout)
        # V^T y of eq. 4 with a one-hot y is a lookup: one learned bias per class and stack.
        self.v_label = nn.Embedding(num_classes, 2 * n) if num_classes else None
        self.h_label = nn.Embedding(num_classes, 2 * n) if num_classes else None
        self.v_pos = nn.Parameter(torch.zeros(2 * n, *size))
        self.h_pos = nn.Parameter(torch.zeros(2 * n, *size))

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.k
        v_pre = self.vertical(F.pad(v, (k, k, k, 0)))  # (B, 2F, H, W), row r sees rows <= r
        h_pre = self.horizontal(F.pad(h, (k, 0, 0, 0))) + self.v_to_h(down_shift(v_pre))
        rows, cols = v_pre.shape[-2:]
        v_pre = v_pre + self.v_pos[:, :rows, :cols]
        h_pre = h_pre + self.h_pos[:, :rows, :cols]
        if y is not None:
            v_pre = v_pre + self.v_label(y)[:, :, None, None]  # (B, 2F, 1, 1) broadcast
            h_pre = h_pre + self.h_label(y)[:, :, None, None]
        h_gated = self.dropout(gate(h_pre))  # (B, F, H, W)
        skip = self.skip(h_gated)
        h_out = h_gated if self.residual is None else h + self.residual(h_gated)
        return self.dropout(gate(v_pre)), h_out, skip


class GatedPixelCNN(nn.Module):
    """Scaled image (B, C, H, W) in [-1, 1] -> logits (B, L, C, H, W) of p(x_i | x_<i, y)."""

    def __init__(
        self,
        image_channels: int,
        levels: int,
        channels: int,
        num_layers: int,
        kernel_size: int,
        num_classes: int | None,
        dropout: float,
        size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.levels = levels
        c = image_channels
        # Input: the C image channels plus a constant-ones channel (group -1, visible to every
        # output) so that zero padding is distinguishable from the mid level 0.0 near borders.
        in_groups = torch.cat([torch.arange(c), torch.tensor([-1])])
        groups = feature_groups(channels, c)
        self.layers = nn.ModuleList(
            GatedLayer(
                in_groups if i == 0 else groups,
                groups,
                kernel_size,
                "A" if i == 0 else "B",
                num_classes,
                dropout,
                size,
            )
            for i in range(num_layers)
        )
        out_groups = torch.arange(c).repeat_interleave(levels)  # feature c·L + l -> channel c
        # ELU rather than the paper's ReLU: a dead ReLU would make some x_j -> x_i gradients
        # exactly zero, and the causality tests read the receptive field off exact zeros.
        self.head = nn.Sequential(
            nn.ELU(),
            MaskedConv2d(groups, groups, (1, 1), "B"),
            nn.ELU(),
            nn.Dropout(dropout),
            MaskedConv2d(groups, out_groups, (1, 1), "B"),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        ones = torch.ones(b, 1, h, w, dtype=x.dtype, device=x.device)
        v = h_stack = torch.cat([x, ones], dim=1)  # (B, C + 1, H, W)
        skips = 0
        for layer in self.layers:
            v, h_stack, skip = layer(v, h_stack, y)
            skips = skips + skip
        logits = self.head(skips)  # (B, C·L, H, W)
        return logits.view(b, c, self.levels, h, w).transpose(1, 2)  # (B, L, C, H, W)


class PixelCNN(GenerativeModule):
    likelihood = "exact"
    has_latent = False
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 30, "batch_size": 64}

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int,
        channels: Annotated[int, Ge(1)] = 64,  # features per stack (split into C groups)
        num_layers: Annotated[int, Ge(1)] = 6,  # gated layers; the first one uses mask A
        kernel_size: Annotated[int, Ge(3)] = 3,  # odd receptive width of each layer
        dropout: Annotated[float, Ge(0), Lt(1)] = 0.2,  # on gated features and in the head
        conditional: bool = False,  # model p(x | y) instead of p(x)
        lr: Annotated[float, Gt(0)] = 2e-3,  # peak AdamW learning rate (cosine decay to 0)
        weight_decay: Annotated[float, Ge(0)] = 0.0,  # AdamW decoupled weight decay
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        self.save_hyperparameters(logger=False)  # genlab logs the resolved config itself
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if channels < image_shape[0]:
            raise ValueError(f"channels ({channels}) must be >= image channels ({image_shape[0]})")
        self.net = GatedPixelCNN(
            image_shape[0],
            levels,
            channels,
            num_layers,
            kernel_size,
            num_classes if conditional else None,
            dropout,
            image_shape[1:],
        )

    # -- network inputs -------------------------------------------------------------------------
    # Levels enter as floats in [-1, 1] rather than a learned embedding: the levels are ordered
    # intensities, and on small data the network should not have to learn that level 7 is close
    # to level 8.
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels (B, C, H, W) -> floats in [-1, 1], (B, C, H, W)."""
        return x.float() / (self.levels - 1) * 2 - 1

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every conditional p(x_i | x_<i, y), (B, L, C, H, W)."""
        return self.net(self._scale(x), y)

    # -- objective ------------------------------------------------------------------------------
    def nll(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x | y) = -sum_i log p(x_i | x_<i, y) in nats per image, (B,)."""
        logits = self.logits(x, y)  # (B, L, C, H, W)
        return F.cross_entropy(logits, x.long(), reduction="none").flatten(1).sum(1)

    # -- contract -------------------------------------------------------------------------------
    def log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1
    ) -> torch.Tensor:
        """Exact log P(x | y) of the discrete image in nats, (B,); `samples` is unused."""
        return -self.nll(x.to(self.device), self.labels_for(y))

    @torch.no_grad()
    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Ancestral sampling: one network pass per pixel, then per channel, in raster order."""
        y = self.labels_for(y)
        c, h, w = self.image_shape
        x = torch.zeros(n, c, h, w, dtype=torch.long, device=self.device)
        for row in range(h):
            for col in range(w):
                for ch in range(c):
                    # Rows below `row` cannot influence it (the convs pad only top and left),
                    # so the pass is over rows 0..row alone.
                    logits = self.logits(x[:, :, : row + 1], y)  # (n, L, C, row + 1, W)
                    x[:, ch, row, col] = self.sample_categorical(
                        logits[:, :, ch, row, col], generator
                    )
        return x.to(torch.uint8)  # (n, C, H, W)

    # -- system ---------------------------------------------------------------------------------
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = self.nll(x, self.labels_for(y)).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpd", bits_per_dim(loss, self.dims))
        return loss

    def configure_optimizers(self) -> dict:
        optimiser = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        # Cosine decay over the whole run, stepped per batch.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
