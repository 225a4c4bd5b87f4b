"""The seed's CNN listing, corrected and built on fastlayers layers.

Images (batch, 3, 32, 32) -> two fused conv blocks (3x3 convolution, padding 1, ReLU
and 2x2 max-pool in one op) -> linear(64*8*8 -> 128) -> ReLU -> linear(128 -> 10).
Trains a few steps on the seed's synthetic random data (random labels: the loss only
shows that the model learns the batch). ``fastlayers.models.CNN`` is the configurable
version of this network.

    python examples/cnn.py [--steps 5]
"""

import argparse
import time

import torch
from torch import nn

import fastlayers.nn as fnn


class CNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = fnn.Conv2dReLUMaxPool2d(3, 32, 3, padding=1)  # 3x32x32 -> 32x16x16
        self.block2 = fnn.Conv2dReLUMaxPool2d(32, 64, 3, padding=1)  # -> 64x8x8
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(100, 3, 32, 32)  # the seed's synthetic data
    labels = torch.randint(0, 10, (100,))
    model = CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f} ({1000 * (time.perf_counter() - start):.1f} ms)")


if __name__ == "__main__":
    main()
