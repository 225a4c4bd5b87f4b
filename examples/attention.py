"""The seed's attention listing, corrected and built on fastlayers layers.

The seed wrapped an attention module around the CNN; attention pooling belongs over a
sequence encoder's outputs. Sequences (batch, steps, features) = (100, 20, 10) go
through an LSTM (``fastlayers.nn.LSTM``, 50 units); ``fastlayers.nn.LuongAttention``
scores every step's output against a learned query (Luong's 'general' score
q^T W h_t), the softmax over the steps weighs them into one context vector, and a
linear layer classifies it. Trains a few steps on the seed's synthetic random data and
prints where the attention looks for the first sequence.
``fastlayers.models.AttentionClassifier`` is the configurable version.

    python examples/attention.py [--steps 5]
"""

import argparse
import time

import torch
from torch import nn

import fastlayers.nn as fnn


class AttentionModel(nn.Module):
    def __init__(self, input_size: int = 10, hidden_size: int = 50, num_classes: int = 10, score: str = "general"):
        super().__init__()
        self.lstm = fnn.LSTM(input_size, hidden_size, batch_first=True)
        self.attention = fnn.LuongAttention(hidden_size, score=score)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, _ = self.lstm(x)  # (batch, steps, hidden)
        context, weights = self.attention(outputs)  # (batch, hidden), (batch, steps)
        return self.fc(context), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    args = parser.parse_args()

    torch.manual_seed(0)
    sequences = torch.randn(100, 20, 10)  # the seed's synthetic data, as sequences
    labels = torch.randint(0, 10, (100,))
    model = AttentionModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        logits, weights = model(sequences)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f} ({1000 * (time.perf_counter() - start):.1f} ms)")
    print("attention over the 20 steps of sequence 0:", " ".join(f"{w:.2f}" for w in weights[0].tolist()))


if __name__ == "__main__":
    main()
