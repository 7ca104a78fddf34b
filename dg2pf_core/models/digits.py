"""A small CNN for 16x16 greyscale digits: the fast, CPU-only demo and test architecture.

About 94 k weights, all in convolutions: compact enough that one-shot magnitude pruning to 90%
breaks it (test top-1 falls to ~20%), large enough that DG2PF recovers full accuracy at 90%, which
is what the demo and the end-to-end tests check. An epoch of the digits takes ~1-2 s on 2 cores.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dg2pf_core.models.registry import register_arch


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2),
            # Global pooling: any input size works, and there is no wide fully connected layer
            # whose redundancy would make pruning look easier than it is on real networks.
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        # Registered last on purpose: pruning and distillation code take the last Conv/Linear
        # in module order to be the classifier.
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_arch(
    "digits_cnn",
    input_size=16,
    in_channels=1,
    description="small 3-conv CNN for 1x16x16 digit images (fast CPU demo; any input size >= 8)",
)
def digits_cnn(num_classes: int) -> nn.Module:
    return DigitsCNN(num_classes)
