"""Drop-in modules, mirroring ``torch.nn``."""

from fastlayers.nn.conv import Conv1d, Conv2d, Conv2dReLU, Conv2dReLUMaxPool2d

__all__ = ["Conv1d", "Conv2d", "Conv2dReLU", "Conv2dReLUMaxPool2d"]
