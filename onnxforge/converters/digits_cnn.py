"""The built-in demo model: a small residual CNN with BatchNorm, trained on the digits split.

Its weights ship next to this file (``digits_cnn.pt``). To retrain them reproducibly::

    python -m onnxforge.converters.digits_cnn --train

Architecture (input 1x32x32): stem Conv3x3(32) -> ResBlock(32) -> Conv3x3/2(64) -> ResBlock(64)
-> Conv3x3/2(128) -> ResBlock(128) -> GlobalAvgPool -> Linear(10). About 0.48 M parameters and
75 M multiply-adds per image: small to ship, large enough that latency is measurable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

__all__ = ["CHECKPOINT_PATH", "DigitsCNN", "load_pretrained"]

CHECKPOINT_PATH = Path(__file__).with_name("digits_cnn.pt")


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(x + y)


class DigitsCNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv_bn(1, w1),
            _ResBlock(w1),
            _conv_bn(w1, w2, stride=2),
            _ResBlock(w2),
            _conv_bn(w2, w3, stride=2),
            _ResBlock(w3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(image))
        return self.classifier(torch.flatten(x, 1))


def load_pretrained() -> DigitsCNN:
    """The demo CNN with its shipped weights, in eval mode."""
    model = DigitsCNN()
    state = torch.load(CHECKPOINT_PATH, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _random_shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def train(epochs: int = 20, seed: int = 0) -> tuple[DigitsCNN, float]:
    """Train on the fixed training split; returns the model and its held-out accuracy."""
    from onnxforge.datasets import load_digits_split

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    split = load_digits_split()
    x = torch.from_numpy(split.train_images)
    y = torch.from_numpy(split.train_labels)
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            batch = _random_shift(x[idx], 2, generator)
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(split.test_images))
        accuracy = float((logits.argmax(1).numpy() == split.test_labels).mean())
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  held-out accuracy {accuracy:.4f}")
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--train", action="store_true", help="retrain and overwrite the checkpoint")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if not args.train:
        parser.print_help()
        return
    torch.set_num_threads(2)
    model, accuracy = train(args.epochs)
    # fp16 storage halves the shipped file; the model is defined by these rounded weights.
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, CHECKPOINT_PATH)
    print(f"saved {CHECKPOINT_PATH} ({CHECKPOINT_PATH.stat().st_size / 1e6:.2f} MB), accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
