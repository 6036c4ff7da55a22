"""Small fully convolutional segmentation network (FCN): strided conv encoder,
1x1 `classifier` conv, bilinear upsampling back to the input size.

Expected mixfx verdict: convolutional, fully convolutional (no head; the output
[B, 5, H, W] keeps varying with H and W).  Rigid node: none.  Head: none.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 3, 128, 160)
NUM_CLASSES = 5


def conv_bn_relu(in_ch, out_ch, stride):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class FCN(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.encoder = nn.Sequential(
            conv_bn_relu(3, 16, 2),
            conv_bn_relu(16, 32, 2),
            conv_bn_relu(32, 64, 2),
        )
        self.classifier = nn.Conv2d(64, num_classes, 1)

    def forward(self, input):
        x = self.encoder(input)
        x = self.classifier(x)
        return F.interpolate(x, size=input.shape[-2:], mode="bilinear", align_corners=False)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return FCN().eval()
