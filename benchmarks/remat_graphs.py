"""Benchmark graphs for rematerialization: our re-creations of the Checkmate inference
graphs (Keras layer graphs, one node per Keras layer, the Input layer excluded and edges from it
not counted), their training graphs, and seeded random layered DAGs.

Node sizes: bytes of the layer output at batch 1 with 8-bit activations (1 byte per element,
``packing="byte"`` of an 8-bit type).  Costs: multiply-accumulates (conv/dense), else one per
output element (pools: per window element).  Training graphs (Checkmate's construction): forward
nodes, a loss node reading the last forward node, and one backward node per forward node that
reads the backward nodes of the forward node's users (the loss for the last one), the forward node
itself and the forward node's inputs; backward size = forward size, cost = 2x forward cost;
outputs = backward nodes with no reader.  Nodes/edges: Checkmate reports VGG16 22, MobileNet 92,
ResNet50 176/191, vgg_unet 35/37, FCN8 36/37, SegNet 38/37, ResNet50 training 353/751.
"""
from __future__ import annotations

import math

import numpy as np

from qdeploy.passes.remat import Problem


class _B:
    """Tiny Keras-like shape tracker that records a Problem."""

    def __init__(self, h, w, c):
        self.names, self.preds, self.src, self.sizes, self.costs, self.shapes = [], [], [], [], [], []
        self.inp = ("input", (h, w, c))

    def _add(self, name, ins, shape, cost):
        self.names.append(name)
        self.preds.append(tuple(i for i in ins if i >= 0))
        self.src.append((0,) if any(i < 0 for i in ins) else ())
        self.sizes.append(int(np.prod(shape)))
        self.costs.append(max(1, int(cost)))
        self.shapes.append(shape)
        return len(self.names) - 1

    def shape(self, i):
        return self.inp[1] if i < 0 else self.shapes[i]

    def conv(self, name, x, f, k, s=1, pad="same", dw=False):
        h, w, c = self.shape(x)
        if pad == "same":
            oh, ow = math.ceil(h / s), math.ceil(w / s)
        else:
            oh, ow = (h - k) // s + 1, (w - k) // s + 1
        f = c if dw else f
        return self._add(name, [x], (oh, ow, f), oh * ow * f * k * k * (1 if dw else c))

    def convT(self, name, x, f, k, s):
        h, w, c = self.shape(x)
        oh, ow = (h - 1) * s + k, (w - 1) * s + k
        return self._add(name, [x], (oh, ow, f), h * w * c * f * k * k)

    def pad(self, name, x, p=1):
        h, w, c = self.shape(x)
        return self._add(name, [x], (h + 2 * p, w + 2 * p, c), (h + 2 * p) * (w + 2 * p) * c)

    def crop(self, name, x, dh=0, dw=0):
        h, w, c = self.shape(x)
        return self._add(name, [x], (h - dh, w - dw, c), (h - dh) * (w - dw) * c)

    def pool(self, name, x, k=2, s=None, pad="valid"):
        s = s or k
        h, w, c = self.shape(x)
        oh, ow = ((h - k) // s + 1, (w - k) // s + 1) if pad == "valid" else (math.ceil(h / s), math.ceil(w / s))
        return self._add(name, [x], (oh, ow, c), oh * ow * c * k * k)

    def up(self, name, x, s=2):
        h, w, c = self.shape(x)
        return self._add(name, [x], (h * s, w * s, c), h * w * c * s * s)

    def ew(self, name, *xs, shape=None):
        shape = shape or self.shape(xs[0])
        return self._add(name, list(xs), shape, np.prod(shape))

    def concat(self, name, *xs):
        sh = [self.shape(x) for x in xs]
        shape = (*sh[0][:-1], sum(s[-1] for s in sh))
        return self._add(name, list(xs), shape, np.prod(shape))

    def dense(self, name, x, n):
        return self._add(name, [x], (n,), int(np.prod(self.shape(x))) * n)

    def flat(self, name, x, shape=None):
        return self._add(name, [x], shape or (int(np.prod(self.shape(x))),), 1)

    def gap(self, name, x):
        h, w, c = self.shape(x)
        return self._add(name, [x], (c,), h * w * c)

    def problem(self, name=None) -> Problem:
        users = set(u for ps in self.preds for u in ps)
        outs = frozenset(v for v in range(len(self.names)) if v not in users)
        p = Problem(self.names, self.preds, self.src, self.sizes, self.costs, ["input"],
                    [int(np.prod(self.inp[1]))], outs)
        p.title = name
        return p


def vgg16(h=224, w=224):
    b = _B(h, w, 3)
    x = -1
    for blk, (n, f) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], 1):
        for i in range(1, n + 1):
            x = b.conv(f"block{blk}_conv{i}", x, f, 3)
        x = b.pool(f"block{blk}_pool", x)
    x = b.flat("flatten", x)
    x = b.dense("fc1", x, 4096)
    x = b.dense("fc2", x, 4096)
    b.dense("predictions", x, 1000)
    return b.problem("VGG16")


def mobilenet(h=224, w=224):
    """Keras MobileNet v1 (alpha 1) as in Keras 2.2: conv1_pad, conv1/bn/relu, 13 depthwise blocks
    (conv_pad_i before stride-2 blocks), GAP, reshape, dropout, conv_preds, softmax, reshape."""
    b = _B(h, w, 3)
    x = b.pad("conv1_pad", -1)
    x = b.conv("conv1", x, 32, 3, 2, pad="valid")
    x = b.ew("conv1_bn", x)
    x = b.ew("conv1_relu", x)
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for i, (f, s) in enumerate(cfg, 1):
        if s == 2:
            x = b.pad(f"conv_pad_{i}", x)
        x = b.conv(f"conv_dw_{i}", x, 0, 3, s, pad="valid" if s == 2 else "same", dw=True)
        x = b.ew(f"conv_dw_{i}_bn", x)
        x = b.ew(f"conv_dw_{i}_relu", x)
        x = b.conv(f"conv_pw_{i}", x, f, 1)
        x = b.ew(f"conv_pw_{i}_bn", x)
        x = b.ew(f"conv_pw_{i}_relu", x)
    x = b.gap("global_average_pooling2d", x)
    x = b.flat("reshape_1", x, (1, 1, 1024))
    x = b.ew("dropout", x)
    x = b.conv("conv_preds", x, 1000, 1)
    x = b.ew("act_softmax", x)
    b.flat("reshape_2", x, (1000,))
    return b.problem("MobileNet")


def resnet50(h=224, w=224):
    b = _B(h, w, 3)
    x = b.pad("conv1_pad", -1, 3)
    x = b.conv("conv1_conv", x, 64, 7, 2, pad="valid")
    x = b.ew("conv1_bn", x)
    x = b.ew("conv1_relu", x)
    x = b.pad("pool1_pad", x, 1)
    x = b.pool("pool1_pool", x, 3, 2)
    for st, (f, n, s) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 2):
        for blk in range(1, n + 1):
            p = f"conv{st}_block{blk}"
            stride = s if blk == 1 else 1
            if blk == 1:
                sc = b.conv(f"{p}_0_conv", x, 4 * f, 1, stride)
                sc = b.ew(f"{p}_0_bn", sc)
            else:
                sc = x
            y = b.conv(f"{p}_1_conv", x, f, 1, stride)
            y = b.ew(f"{p}_1_relu", b.ew(f"{p}_1_bn", y))
            y = b.conv(f"{p}_2_conv", y, f, 3)
            y = b.ew(f"{p}_2_relu", b.ew(f"{p}_2_bn", y))
            y = b.ew(f"{p}_3_bn", b.conv(f"{p}_3_conv", y, 4 * f, 1))
            x = b.ew(f"{p}_out", b.ew(f"{p}_add", y, sc))
    x = b.gap("avg_pool", x)
    b.dense("predictions", x, 1000)
    return b.problem("ResNet50")


def _vgg_encoder(b, levels=5):
    x, fs = -1, []
    for blk, (n, f) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)][:levels], 1):
        for i in range(1, n + 1):
            x = b.conv(f"block{blk}_conv{i}", x, f, 3)
        x = b.pool(f"block{blk}_pool", x)
        fs.append(x)
    return fs


def _seg_head(b, o, n_classes):
    h, w, c = b.shape(o)
    o = b.flat("reshape", o, (h * w, c))
    return b.ew("softmax", o)


def vgg_unet(h=416, w=608, n_classes=12):
    """keras_segmentation vgg_unet (l1 skip connection on): VGG encoder to f4, _unet decoder."""
    b = _B(h, w, 3)
    f1, f2, f3, f4 = _vgg_encoder(b, 4)
    o = f4
    for lvl, (f, skip) in enumerate([(512, f3), (256, f2), (128, f1)]):
        o = b.pad(f"dec{lvl}_pad", o)
        o = b.conv(f"dec{lvl}_conv", o, f, 3, pad="valid")
        o = b.ew(f"dec{lvl}_bn", o)
        o = b.up(f"dec{lvl}_up", o)
        o = b.concat(f"dec{lvl}_concat", o, skip)
    o = b.pad("dec3_pad", o)
    o = b.conv("dec3_conv", o, 64, 3, pad="valid")
    o = b.ew("dec3_bn", o)
    o = b.conv("final_conv", o, n_classes, 3)
    _seg_head(b, o, n_classes)
    return b.problem("U-Net (vgg_unet)")


def fcn8(h=416, w=608, n_classes=12):
    """keras_segmentation fcn_8 on the VGG encoder (two Cropping2D layers per crop call)."""
    b = _B(h, w, 3)
    f1, f2, f3, f4, f5 = _vgg_encoder(b, 5)
    o = b.conv("fc6", f5, 4096, 7)
    o = b.ew("drop6", o)
    o = b.conv("fc7", o, 4096, 1)
    o = b.ew("drop7", o)
    o = b.conv("score_fr", o, n_classes, 1)
    o = b.convT("up2", o, n_classes, 4, 2)
    o2 = b.conv("score_pool4", f4, n_classes, 1)

    def crop(a, c, tag):
        (ha, wa, _), (hc, wc, _) = b.shape(a), b.shape(c)
        if wa > wc:
            a = b.crop(f"{tag}_cw", a, 0, wa - wc)
        else:
            c = b.crop(f"{tag}_cw", c, 0, wc - wa)
        if ha > hc:
            a = b.crop(f"{tag}_ch", a, ha - hc, 0)
        else:
            c = b.crop(f"{tag}_ch", c, hc - ha, 0)
        return a, c

    o, o2 = crop(o, o2, "crop1")
    o = b.ew("add1", o, o2)
    o = b.convT("up4", o, n_classes, 4, 2)
    o2 = b.conv("score_pool3", f3, n_classes, 1)
    o2, o = crop(o2, o, "crop2")
    o = b.ew("add2", o2, o)
    o = b.convT("up32", o, n_classes, 16, 8)
    _seg_head(b, o, n_classes)
    return b.problem("FCN8")


def segnet(h=416, w=608, n_classes=12):
    """keras_segmentation segnet: vanilla encoder (pad/conv/bn/relu/pool x4) + segnet_decoder(n_up=3)."""
    b = _B(h, w, 3)
    x = -1
    for i, f in enumerate([64, 128, 256, 256], 1):
        x = b.pad(f"enc{i}_pad", x)
        x = b.conv(f"enc{i}_conv", x, f, 3, pad="valid")
        x = b.ew(f"enc{i}_relu", b.ew(f"enc{i}_bn", x))
        x = b.pool(f"enc{i}_pool", x)
    o = x
    for i, (f, up) in enumerate([(512, False), (256, True), (128, True), (64, True)]):
        if up:
            o = b.up(f"dec{i}_up", o)
        o = b.pad(f"dec{i}_pad", o)
        o = b.conv(f"dec{i}_conv", o, f, 3, pad="valid")
        o = b.ew(f"dec{i}_bn", o)
    o = b.conv("final_conv", o, n_classes, 3)
    _seg_head(b, o, n_classes)
    return b.problem("SegNet")


def training(p: Problem) -> Problem:
    """Checkmate-style training graph of a forward graph ``p`` (see the module docstring)."""
    n = p.n
    preds = [tuple(x) for x in p.preds]
    src = [tuple(x) for x in p.src_preds]
    last = max(range(n), key=lambda v: (v in p.outputs, v))
    preds.append((last,))
    src.append(())
    # backward nodes in reverse topological order of the forward graph
    order = list(range(n - 1, -1, -1))
    bidx = {v: n + 1 + k for k, v in enumerate(order)}
    names = list(p.names) + ["loss"] + [f"grad_{p.names[v]}" for v in order]
    for v in order:
        ps = [bidx[u] for u in p.users[v]] + ([n] if v == last else []) + [v] + list(p.preds[v])
        preds.append(tuple(dict.fromkeys(ps)))
        src.append(tuple(p.src_preds[v]))
    sizes = list(p.sizes) + [1] + [p.sizes[v] for v in order]
    costs = list(p.costs) + [max(1, p.sizes[last])] + [2 * p.costs[v] for v in order]
    users = set(u for ps in preds for u in ps)
    outs = frozenset(v for v in range(len(names)) if v not in users)
    q = Problem(names, preds, src, sizes, costs, list(p.src_names), list(p.src_sizes), outs)
    q.title = f"{p.title} (train)"
    return q


def random_layered(n: int, seed: int = 0) -> Problem:
    """Seeded random layered DAG: ``n`` nodes in ``ceil(sqrt(n))`` layers of near-equal width; a
    node in layer ``l > 0`` reads one random node of layer ``l-1`` and, with probability 0.5
    each, up to two random nodes of earlier layers (skip edges); layer-0 nodes read the graph
    input.  Sizes: 2**U{4..12} bytes; costs: U{1..100} * size / 16; outputs: nodes nobody reads."""
    rng = np.random.default_rng(seed)
    L = max(2, math.ceil(math.sqrt(n)))
    layer = np.sort(np.concatenate([np.arange(L), rng.integers(0, L, n - L)]))
    names, preds, src, sizes, costs = [], [], [], [], []
    by_layer = {}
    for v in range(n):
        lv = int(layer[v])
        by_layer.setdefault(lv, []).append(v)
        if lv == 0:
            ps, sp = (), (0,)
        else:
            ps = [int(rng.choice(by_layer[lv - 1]))]
            for _ in range(2):
                if lv >= 2 and rng.random() < 0.5:
                    ps.append(int(rng.integers(0, by_layer[lv - 1][0])))
            ps, sp = tuple(dict.fromkeys(ps)), ()
        names.append(f"n{v}")
        preds.append(ps)
        src.append(sp)
        s = int(2 ** rng.integers(4, 13))
        sizes.append(s)
        costs.append(max(1, int(rng.integers(1, 101)) * s // 16))
    users = set(u for ps in preds for u in ps)
    outs = frozenset(v for v in range(n) if v not in users)
    p = Problem(names, preds, src, sizes, costs, ["input"], [256], outs)
    p.title = f"random-{n}"
    return p


CHECKMATE_COUNTS = {"VGG16": (22, None), "MobileNet": (92, None), "ResNet50": (176, 191),
                    "U-Net (vgg_unet)": (35, 37), "FCN8": (36, 37), "SegNet": (38, 37),
                    "ResNet50 (train)": (353, 751)}


def all_graphs(random_sizes=(100, 250, 500, 1000)) -> list[Problem]:
    inf = [vgg16(), mobilenet(), resnet50(), vgg_unet(), fcn8(), segnet()]
    return inf + [training(p) for p in inf] + [random_layered(n, seed=n) for n in random_sizes]


if __name__ == "__main__":
    for p in all_graphs():
        want = CHECKMATE_COUNTS.get(p.title, (None, None))
        print(f"{p.title:24s} nodes {p.n:5d} edges {p.edges:5d}   Checkmate: {want}")
