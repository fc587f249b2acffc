"""A small CNN for the image-classification family (the seam's reference model): conv-BN-ReLU
stages with stride-2 downsampling, global average pooling, a linear head."""
from __future__ import annotations

import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))
