"""A tiny PyTorch teacher for the distillation tests: Conv-BN-ReLU x2, average pool, Linear.

Its weights and BatchNorm statistics come from a fixed seed (not trained): what the tests check is
that the student is the pruned graph's network and that training it against this teacher recovers
what pruning removed, which needs no trained teacher.
"""

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = TinyCNN()
    for bn in (model.bn1, model.bn2):  # statistics that matter when BatchNorm is folded
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    with torch.no_grad():  # centred, spread class scores: every class is predicted for some inputs
        x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        pooled = torch.relu(model.bn2(model.conv2(torch.relu(model.bn1(model.conv1(x)))))).mean((2, 3))
        model.fc.weight.mul_(4.0 / pooled.std(0))
        model.fc.bias.copy_(-model.fc.weight @ pooled.mean(0))
    return model.eval(), {"x": torch.zeros(2, 3, 8, 8)}
