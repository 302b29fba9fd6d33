"""Small reference models that export cleanly and pass the plan audit (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "FedDigitsCNN", "WideDigitsCNN", "MODELS", "digits_example_input"]


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


class FedDigitsCNN(nn.Module):
    """The CNN of the "fedavg-digits" work (issue 4): Conv(1,32,3,p1)-ReLU-Conv(32,64,3,p1)-ReLU-MaxPool2-Flatten-
    Linear(1024,128)-ReLU-Linear(128,10), on 8x8 digits in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))  # [B, 64, 4, 4]
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class WideDigitsCNN(FedDigitsCNN):
    """:class:`FedDigitsCNN` with a 6144-unit hidden layer: 6.4 M parameters, about 25 MB of float32 weights, so
    that moving the model (not training it) is what a round costs. For measuring transfers (bench/fedavg_rounds.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64 * 4 * 4, 6144)
        self.fc2 = nn.Linear(6144, 10)


# the CLI's --model choices
MODELS = {"digits-cnn": DigitsCNN, "fed-digits-cnn": FedDigitsCNN, "wide-digits-cnn": WideDigitsCNN}


def digits_example_input(batch: int = 4) -> torch.Tensor:
    """An example input for :class:`DigitsCNN` (the batch size is exported as dynamic)."""
    return torch.zeros(batch, 1, 8, 8)
