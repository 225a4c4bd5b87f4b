"""The seed's RNN listing, corrected and built on fastlayers layers.

The seed fed a 2-D (batch, features) tensor to a batch-first RNN; a recurrent layer
reads sequences: (batch, steps, features) = (100, 20, 10) here. Two Elman RNN layers of
50 units (``fastlayers.nn.RNN``), then a linear layer on the last step's output.
Trains a few steps on the seed's synthetic random data. ``fastlayers.models.RNNClassifier``
is the configurable version.

    python examples/rnn.py [--steps 5]
"""

import argparse
import time

import torch
from torch import nn

import fastlayers.nn as fnn


class RNNModel(nn.Module):
    def __init__(self, input_size: int = 10, hidden_size: int = 50, num_layers: int = 2, num_classes: int = 10):
        super().__init__()
        self.rnn = fnn.RNN(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (batch, steps, hidden)
        return self.fc(out[:, -1])  # the last step's output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    args = parser.parse_args()

    torch.manual_seed(0)
    sequences = torch.randn(100, 20, 10)  # the seed's synthetic data, as sequences
    labels = torch.randint(0, 10, (100,))
    model = RNNModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(sequences), labels)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f} ({1000 * (time.perf_counter() - start):.1f} ms)")


if __name__ == "__main__":
    main()
