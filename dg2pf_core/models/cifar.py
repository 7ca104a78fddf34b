"""CIFAR-sized (32x32) networks used in the DG2PF paper's CIFAR-10/100 experiments."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from dg2pf_core.models.registry import register_arch

CIFAR_INPUT_SIZE = 32


def _cifar_stem(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    # The ImageNet stem (7x7 stride-2 conv + maxpool) shrinks 32x32 inputs to 8x8 before the
    # first block; the CIFAR variant keeps full resolution. Attribute names are unchanged so
    # state_dict keys stay torchvision's and torchvision-style checkpoints load as-is.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_arch(
    "cifar/resnet18",
    input_size=CIFAR_INPUT_SIZE,
    in_channels=3,
    description="ResNet-18 with a 3x3 stride-1 stem and no max-pool (CIFAR variant)",
)
def cifar_resnet18(num_classes: int) -> nn.Module:
    return _cifar_stem(torchvision.models.resnet18(weights=None, num_classes=num_classes))


@register_arch(
    "cifar/resnet50",
    input_size=CIFAR_INPUT_SIZE,
    in_channels=3,
    description="ResNet-50 with a 3x3 stride-1 stem and no max-pool (CIFAR variant)",
)
def cifar_resnet50(num_classes: int) -> nn.Module:
    return _cifar_stem(torchvision.models.resnet50(weights=None, num_classes=num_classes))


VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


class CifarVGG(nn.Module):
    """VGG with batch norm and a single linear classifier over the final 1x1x512 map."""

    def __init__(self, cfg: list[int | str], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_arch(
    "cifar/vgg16_bn",
    input_size=CIFAR_INPUT_SIZE,
    in_channels=3,
    description="VGG-16 with batch norm and a single linear classifier (CIFAR variant)",
)
def cifar_vgg16_bn(num_classes: int) -> nn.Module:
    return CifarVGG(VGG16_CFG, num_classes)
