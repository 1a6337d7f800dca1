"""Network architectures shared by training and serving.

`VesselUNet` is a compact U-Net with one 3-channel output: vessel, artery and vein logits.
The vessel channel is a per-pixel sigmoid; the artery and vein channels form a 2-way softmax
that is only meaningful on vessel pixels (it is trained only there). One network for both
tasks: a single pass per image, and the A/V decision shares the vessel features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

VESSEL, ARTERY, VEIN = 0, 1, 2  # output channels


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU (bias-free convs: BatchNorm supplies the shift)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VesselUNet(nn.Module):
    """U-Net: max-pool down, bilinear up + skip concatenation, a 1x1 head.

    Input sides must be multiples of 2 ** (len(widths) - 1). The deepest levels are what give
    the artery/vein decision its context (a receptive field of about 200 px at 5 levels).
    """

    def __init__(
        self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128, 256), classes: int = 3
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.down = nn.ModuleList()
        previous = in_channels
        for width in self.widths:
            self.down.append(_block(previous, width))
            previous = width
        self.up = nn.ModuleList(
            _block(deep + skip, skip)
            for deep, skip in zip(self.widths[:0:-1], self.widths[-2::-1], strict=True)
        )
        self.head = nn.Conv2d(self.widths[0], classes, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be divisible by this."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for index, block in enumerate(self.down):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, skips[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d that follows a Conv2d into that conv, in place, for inference.

    In eval mode a batch norm is a fixed per-channel scale and shift, so the conv can carry it:
    one op instead of two, the same outputs up to rounding (batch norm took about a tenth of a
    lesion pass in a CPU profile). The net must be in eval mode and is no longer trainable as
    before.
    """
    for module in list(net.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[index] = fuse_conv_bn_eval(conv, norm)
                module[index + 1] = nn.Identity()
    return net
