"""A small CNN for scikit-learn's bundled 8x8 handwritten digits, and its deterministic training.

The data set ships inside scikit-learn (1797 images of 8x8 pixels, values 0..16, 10 classes), so
nothing is downloaded. The split is fixed: 360 test images, stratified by class, seed 0. The
network has both kinds of layer that weight quantisation rewrites (Conv2d and Linear) and trains
to 97-98% test accuracy (98.06% with seed 0) in about a second on one CPU core.

A demo, not part of the installed package (it needs scikit-learn, which only the dev extra
installs): tests import it through pytest's `pythonpath` (pyproject), benchmarks through their
path setup. `modelpress.pipelines.deep_compression` runs on it with
`TrainingSet(data.x_train, data.y_train)` and `lambda m: accuracy(m, data)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ConfigError

__all__ = ["Digits", "DigitsCNN", "DigitsLeNet5", "DigitsMLP", "load_digits_data", "train", "accuracy", "TEST_SIZE",
           "SPLIT_SEED"]

TEST_SIZE = 360
SPLIT_SEED = 0


@dataclass(frozen=True)
class Digits:
    """The fixed split: images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data() -> Digits:
    """scikit-learn's digits, split 1437 train / 360 test (stratified, seed 0)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError("the digits data set needs scikit-learn: pip install 'modelpress[dev]'") from None
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)  # (1797,)
    index = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(index, test_size=TEST_SIZE, stratify=bunch.target, random_state=SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Digits(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


class DigitsCNN(nn.Module):
    """conv 1->16 3x3, conv 16->32 3x3, 2x2 max-pool, linear 512->64, linear 64->10 (38,282 parameters)."""

    def __init__(self, seed: int | None = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global generator
            if seed is not None:
                torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10) logits
        h = F.relu(self.conv1(x))  # (B, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 32, 4, 4)
        h = F.relu(self.fc1(h.flatten(1)))  # (B, 64)
        return self.fc2(h)


class DigitsMLP(nn.Module):
    """LeNet-300-100 on 8x8 digits: linear 64->300->100->10 with ReLU (50,890 parameters).

    The fully connected network of the Deep Compression paper (there on 28x28 MNIST), here on
    the 64 pixels of scikit-learn's digits.
    """

    def __init__(self, seed: int | None = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.fc1 = nn.Linear(64, 300)
            self.fc2 = nn.Linear(300, 100)
            self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10) logits
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.fc3(h)


class DigitsLeNet5(nn.Module):
    """A LeNet-5-style CNN for 8x8 digits (42,794 parameters; fully connected layers dominate, as in LeNet-5).

    conv 1->6 3x3, conv 6->16 3x3, 2x2 max-pool, linear 256->120->84->10, ReLU between.
    """

    def __init__(self, seed: int | None = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
            self.fc1 = nn.Linear(16 * 4 * 4, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10) logits
        h = F.relu(self.conv1(x))  # (B, 6, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 16, 4, 4)
        h = F.relu(self.fc1(h.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.fc3(h)


def train(
    model: nn.Module,
    data: Digits,
    epochs: int = 20,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 64,
    threads: int | None = 1,
) -> list[float]:
    """Minimise cross-entropy with Adam on the training split; returns the mean loss of each epoch.

    Deterministic on CPU for a given seed: the batch order comes from a private generator, nothing
    else is random, and the run uses `threads` intra-op threads (restored afterwards; None keeps
    the caller's), so float reductions happen in the same order. One thread is also the fastest
    for batches this small. The model is left in eval mode.
    """
    if epochs < 0 or lr <= 0 or batch_size < 1 or (threads is not None and threads < 1):
        raise ConfigError(
            "train needs epochs >= 0, lr > 0, batch_size >= 1 and threads >= 1, "
            f"got {epochs}, {lr}, {batch_size}, {threads}"
        )
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(model, data, epochs, lr, seed, batch_size)
    finally:
        torch.set_num_threads(previous)


def _train(model: nn.Module, data: Digits, epochs: int, lr: float, seed: int, batch_size: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    n = len(data.y_train)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / n)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    """Fraction of the 360 test images classified correctly."""
    model.eval()
    return (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()
