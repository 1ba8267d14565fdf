"""ferkit's own networks for small grayscale face crops (48×48 by default)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ferkit.models.registry import register_model


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FastCNN(nn.Module):
    """Small VGG-style CNN for CPU inference: a strided stem, then three stages of two 3×3 convs.

    Most of the cost of a 48×48 CNN sits in the full-resolution layers; striding the second convolution keeps the
    cost near 20 M multiply-adds while the first layer still sees every pixel.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        stem: int = 16,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            conv_bn(in_chans, stem),
            conv_bn(stem, w1, stride=2),  # 24×24
            conv_bn(w1, w1),
            nn.MaxPool2d(2),  # 12×12
            conv_bn(w1, w2),
            conv_bn(w2, w2),
            nn.MaxPool2d(2),  # 6×6
            conv_bn(w2, w3),
            conv_bn(w3, w3),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(w3, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FastCNNSpatial(FastCNN):
    """FastCNN with a head that keeps *where* features are: 1×1 reduction, then a small MLP over the 6×6 map.

    Global average pooling forgets that mouths are at the bottom and eyes at the top of a face crop; flattening the
    reduced 6×6 map keeps that layout for about 0.3 M extra multiply-adds.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        stem: int = 16,
        dropout: float = 0.3,
        reduce: int = 32,
        hidden: int = 128,
        input_size: int = 48,
    ) -> None:
        super().__init__(num_classes, in_chans, widths, stem, dropout)
        side = input_size // 8
        self.head = nn.Sequential(
            nn.Conv2d(widths[-1], reduce, 1, bias=False),
            nn.BatchNorm2d(reduce),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(side),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(reduce * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


class VGGNet(nn.Module):
    """Deep VGG-style CNN with BatchNorm after Khaireddin & Chen (2021): four stages of two 3×3 convs, 64→512.

    The strong from-scratch baseline on FER2013 (73.28% PublicTest with their 300-epoch recipe).
    """

    def __init__(
        self, num_classes: int, in_chans: int = 1, widths: tuple[int, ...] = (64, 128, 256, 512), dropout: float = 0.4
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for w in widths:
            layers += [conv_bn(cin, w), conv_bn(w, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(cin, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


class ResNet48(nn.Module):
    """ResNet-18 layout for 48×48 inputs: a 3×3 stem without max-pooling, four stages of two basic blocks."""

    def __init__(
        self, num_classes: int, in_chans: int = 1, widths: tuple[int, ...] = (64, 128, 256, 512), dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_chans, widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model("fastcnn", description="small fast CNN for CPU inference (~20 M MACs at 48×48)")
def fastcnn(num_classes: int, in_chans: int = 1) -> nn.Module:
    return FastCNN(num_classes, in_chans)


@register_model("fastcnn_sp", description="fastcnn with a spatial head (keeps the face layout), same speed")
def fastcnn_sp(num_classes: int, in_chans: int = 1) -> nn.Module:
    return FastCNNSpatial(num_classes, in_chans)


@register_model("fastcnn_pn", description="fastcnn that standardises each face (own mean/std) before the convolutions")
def fastcnn_pn(num_classes: int, in_chans: int = 1) -> nn.Module:
    # Per-image standardisation (InstanceNorm without affine on the input) removes exposure and contrast differences
    # between photos before the network sees them; it exports to ONNX as one InstanceNormalization node.
    net = FastCNN(num_classes, in_chans)
    net.features.insert(0, nn.InstanceNorm2d(in_chans, affine=False, eps=1e-3))
    return net


@register_model("fastcnn_wide", description="wider fast CNN (~2× fastcnn's cost), a stronger CPU student")
def fastcnn_wide(num_classes: int, in_chans: int = 1) -> nn.Module:
    return FastCNN(num_classes, in_chans, widths=(48, 96, 192), stem=24)


@register_model("fastcnn_xl", description="fastcnn at 64/128/256 channels (~4× fastcnn's cost): CPU accurate tier")
def fastcnn_xl(num_classes: int, in_chans: int = 1) -> nn.Module:
    # Widths are multiples of 64 so the bf16 matrix kernels run full tiles; ~96 M multiply-adds at 48×48.
    return FastCNN(num_classes, in_chans, widths=(64, 128, 256), stem=32, dropout=0.4)


@register_model("vgg", description="deep VGG-style CNN with BatchNorm, 64→512 (Khaireddin & Chen 2021)")
def vgg(num_classes: int, in_chans: int = 1) -> nn.Module:
    return VGGNet(num_classes, in_chans)


@register_model("resnet18", description="ResNet-18 layout adapted to 48×48 inputs")
def resnet18(num_classes: int, in_chans: int = 1) -> nn.Module:
    return ResNet48(num_classes, in_chans)
