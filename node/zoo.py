"""Small reference models that export cleanly and pass the plan audit (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "digits_example_input"]


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits: input ``[B, 1, 8, 8]`` in [0, 1], 10 logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # [B, 16, 4, 4]
        x = self.pool(torch.relu(self.conv2(x)))  # [B, 32, 2, 2]
        return self.fc(torch.flatten(x, 1))


def digits_example_input(batch: int = 4) -> torch.Tensor:
    """An example input for :class:`DigitsCNN` (the batch size is exported as dynamic)."""
    return torch.zeros(batch, 1, 8, 8)
