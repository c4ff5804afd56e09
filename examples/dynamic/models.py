"""Dynamic test networks (structures from DyCL's evaluation set), small sizes.

* :class:`ShallowDeep` -- internal classifiers exit early when max-softmax > 0.9 (digits 8x8).
* :class:`SkipNet` -- gated ResNet: a per-block gate decides skip or execute (CIFAR-like 32x32).
* :class:`BlockDrop` -- a policy net emits a keep/drop mask for all blocks at once (32x32).
* :class:`TopOneMoE` -- top-1 mixture of experts over a flattened digit (64 features).
* :class:`CondGate` -- a gated block written with ``torch.cond`` (captured through the same path).

Each ``forward`` is written for batch 1, as eager PyTorch requires for ``if tensor:``.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShallowDeep(nn.Module):
    """Shallow-Deep network (Kaya et al. 2019): three stages, an internal classifier after the
    first two; exit when the classifier is confident."""

    def __init__(self, classes=10, threshold=0.9):
        super().__init__()
        self.threshold = threshold
        self.stage1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.ic1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.ic2 = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, classes))
        self.stage3 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x):
        x = self.stage1(x)
        out1 = self.ic1(x)
        if F.softmax(out1, dim=1).max() > self.threshold:
            return out1
        x = self.stage2(x)
        out2 = self.ic2(x)
        if F.softmax(out2, dim=1).max() > self.threshold:
            return out2
        x = self.stage3(x)
        return self.fc(x.view(x.size(0), -1))

    def all_heads(self, x):
        """Training helper: the three classifiers' logits."""
        h1 = self.stage1(x)
        h2 = self.stage2(h1)
        h3 = self.stage3(h2)
        return self.ic1(h1), self.ic2(h2), self.fc(torch.flatten(h3, 1))


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Gate(nn.Module):
    """SkipNet feed-forward gate: pool, 1x1 conv, global pool, linear -> one logit."""

    def __init__(self, c):
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(c, 4, 1)
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        h = F.relu(self.conv(self.pool(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class SkipNet(nn.Module):
    """SkipNet-style gated ResNet (Wang et al. 2018) on 32x32 inputs."""

    def __init__(self, c=16, n_blocks=4, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(BasicBlock(c) for _ in range(n_blocks))
        self.gates = nn.ModuleList(Gate(c) for _ in range(n_blocks))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for block, gate in zip(self.blocks, self.gates):
            if torch.sigmoid(gate(x)) > 0.5:
                x = F.relu(x + block(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


class BlockDrop(nn.Module):
    """BlockDrop-style network (Wu et al. 2018): a policy net looks at the input once and emits
    a keep/drop decision for every residual block."""

    def __init__(self, c=16, n_blocks=4, classes=10):
        super().__init__()
        self.policy = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(8, n_blocks))
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(BasicBlock(c) for _ in range(n_blocks))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        probs = torch.sigmoid(self.policy(x))
        keep = probs > 0.5
        x = self.stem(x)
        for i in range(len(self.blocks)):
            if keep[0, i]:
                x = F.relu(x + self.blocks[i](x))
        return self.head(x.mean((2, 3)))


class TopOneMoE(nn.Module):
    """A top-1 mixture-of-experts layer between an encoder and a head (Switch-style routing)."""

    def __init__(self, d_in=64, d=32, n_experts=4, classes=10):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d_in, d), nn.ReLU())
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
                                     for _ in range(n_experts))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.enc(x)
        scores = F.softmax(self.router(h), dim=1)
        k = scores.argmax(dim=1)
        for i, expert in enumerate(self.experts):
            if k == i:
                y = expert(h) * scores[0, i]
        return self.head(h + y)


class CondGate(nn.Module):
    """One gated residual block written with ``torch.cond``."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = BasicBlock(c)
        self.gate = Gate(c)
        self.head = nn.Linear(c, 10)

    def run_block(self, x):
        return F.relu(x + self.block(x))

    def skip(self, x):
        return x.clone()

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cond(self.gate(x).sum() > 0, self.run_block, self.skip, (x,))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CondNested(nn.Module):
    """Two sequential ``torch.cond`` gates; the second one's true branch holds a nested
    ``torch.cond`` (captured through ``torch.export``: 3 conditions, 4 paths)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block1, self.block2, self.block3 = BasicBlock(c), BasicBlock(c), BasicBlock(c)
        self.gate1, self.gate2, self.gate3 = Gate(c), Gate(c), Gate(c)
        self.head = nn.Linear(c, 10)

    def run1(self, x):
        return F.relu(x + self.block1(x))

    def run2(self, x):
        h = F.relu(x + self.block2(x))
        return torch.cond(self.gate3(h).sum() > 0, self.run3, self.halve, (h,))

    def run3(self, x):
        return F.relu(x + self.block3(x))

    def halve(self, x):
        return x * 0.5

    def skip(self, x):
        return x.clone()

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cond(self.gate1(x).sum() > 0, self.run1, self.skip, (x,))
        x = torch.cond(self.gate2(x).sum() > 0, self.run2, self.skip, (x,))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial running statistics (random weights, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@functools.lru_cache(maxsize=4)
def train_shallow_deep(seed: int = 0, epochs: int = 3):
    """ShallowDeep briefly trained on scikit-learn digits (8x8); returns (model, (Xte, yte))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    d = load_digits()
    X = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed)
    m = ShallowDeep()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), 64):
            b = perm[i:i + 64]
            loss = sum(F.cross_entropy(o, ytr[b]) for o in m.all_heads(Xtr[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval(), (Xte, yte)


@torch.no_grad()
def calibrate_gates(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Centre the random gates / policy so that branches split roughly half-half on ``x``
    (random weights otherwise tend to take the same branch for every input)."""
    if isinstance(model, SkipNet):
        h = model.stem(x)
        for block, gate in zip(model.blocks, model.gates):
            g = gate(h)[:, 0]
            gate.fc.bias -= g.median()
            gate.fc.weight *= 4.0 / (g.std() + 1e-6)
            gate.fc.bias *= 4.0 / (g.std() + 1e-6)
            h = F.relu(h + block(h))
    elif isinstance(model, BlockDrop):
        p = model.policy(x)
        lin = model.policy[-1]
        lin.bias -= p.median(0).values
    elif isinstance(model, CondGate):
        h = F.relu(model.stem(x))
        model.gate.fc.bias -= model.gate(h)[:, 0].median()
    elif isinstance(model, CondNested):
        h = F.relu(model.stem(x))
        model.gate1.fc.bias -= model.gate1(h)[:, 0].median()
        h = model.run1(h)
        model.gate2.fc.bias -= model.gate2(h)[:, 0].median()
        h = F.relu(h + model.block2(h))
        model.gate3.fc.bias -= model.gate3(h)[:, 0].median()
    elif isinstance(model, TopOneMoE):
        r = model.router(model.enc(x))
        model.router.bias -= r.mean(0)
    return model


def build(name: str, seed: int = 0, n_blocks: int = 4):
    """(model in eval mode, example input of batch 1, random input generator(n, seed)).
    ``n_blocks``: residual blocks of SkipNet / BlockDrop (tests use 3 to compile faster)."""
    torch.manual_seed(seed)
    if name == "shallow_deep":
        m, _ = train_shallow_deep(seed)
        m = copy.deepcopy(m)
        shape = (1, 8, 8)
    elif name == "skipnet":
        m = randomize_bn(SkipNet(n_blocks=n_blocks), seed)
        shape = (3, 32, 32)
    elif name == "blockdrop":
        m = randomize_bn(BlockDrop(n_blocks=n_blocks), seed)
        shape = (3, 32, 32)
    elif name == "moe":
        m = TopOneMoE().eval()
        shape = (64,)
    elif name == "cond_gate":
        m = randomize_bn(CondGate(), seed)
        shape = (3, 32, 32)
    elif name == "cond_nested":  # not in MODELS (the benchmark set): a capture test model
        m = randomize_bn(CondNested(), seed)
        shape = (3, 32, 32)
    else:
        raise KeyError(name)

    def inputs(n, s=1):
        g = torch.Generator().manual_seed(s)
        if name == "shallow_deep":
            return torch.rand((n, *shape), generator=g)
        return torch.randn((n, *shape), generator=g)

    calibrate_gates(m, inputs(256, 999))
    return m, inputs(1, 12345), inputs


MODELS = ("shallow_deep", "skipnet", "blockdrop", "moe", "cond_gate")
