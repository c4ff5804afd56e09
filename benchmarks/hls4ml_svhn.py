"""IR graphs of the hls4ml tutorial's SVHN CNN (part 6, "Convolutional Neural Networks in hls4ml"),
for ``benchmarks/estimate_vs_published.py``.

The published Vivado HLS 2020.1 reports (``fastmachinelearning/hls4ml-tutorial``,
``archived/pruned_cnn`` and ``archived/quantized_pruned_cnn``, xcu250, 5 ns, io_stream, Latency,
reuse factor 1) are of two trainings of one architecture (tutorial ``part6_cnns.ipynb``):

    Input 32x32x3 -> 3 x [Conv2D 3x3 valid (16, 16, 24 filters) + BN + ReLU + MaxPool 2x2]
    -> Flatten (96) -> Dense 42 + BN + ReLU -> Dense 64 + BN + ReLU -> Dense 10 -> Softmax

* ``pruned``: float Keras, 50% of every Conv/Dense kernel pruned (not the output layer), hls4ml
  ``default_precision='ap_fixed<16,6>'`` everywhere; BatchNorm fused into the kernels.
* ``qkeras6``: ``QConv2DBatchnorm`` (BN folded, weights and biases ``quantized_bits(6,0,alpha=1)``
  = ``ap_fixed<6,1>``), ``QDense`` 6-bit weights followed by an unfused BatchNormalization
  (hls4ml ``normalize`` layers, ``ap_fixed<16,6>``), ``quantized_relu(6)`` (``ap_ufixed<6,0>``,
  rounding and saturating), float output Dense, also 50% pruned; every other type hls4ml's
  default ``ap_fixed<16,6>`` (the reports show 16-bit conv, pool and dense outputs, 6-bit relu outputs).

The trained weights were not published.  Stand-in: Keras' ``lecun_uniform`` initializer the
tutorial uses (``U(-l, l)``, ``l = sqrt(3 / fan_in)``), the 50% smallest magnitudes set to zero
(``prune_low_magnitude``), quantized to the published weight type; fixed seed.  Which weights are
zero, +-2**k or hard to multiply decides the DSP/LUT split, so per-layer DSP and LUT figures
depend on this stand-in.
"""
from __future__ import annotations

import numpy as np

FILTERS = (16, 16, 24)
DENSE = (42, 64)


def _kernel(rng, shape, fan_in, prune: bool):
    lim = np.sqrt(3.0 / fan_in)
    w = rng.uniform(-lim, lim, shape)
    if prune:
        cut = np.quantile(np.abs(w), 0.5)
        w = np.where(np.abs(w) <= cut, 0.0, w)
    return w


def svhn_graph(variant: str, seed: int = 0):
    """The SVHN CNN as an IR graph: ``variant`` ``"pruned"`` (16-bit) or ``"qkeras6"``.

    Returns ``(graph, layers)`` where ``layers`` maps the published report's instance names
    (``conv1``, ``conv2``, ``conv3``, ``relu1``, ``pool1``) to the IR node names of that hls4ml
    layer.

    Raises:
        ValueError: an unknown variant.
    """
    from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
    if variant not in ("pruned", "qkeras6"):
        raise ValueError(f"variant must be 'pruned' or 'qkeras6', got {variant!r}")
    rng = np.random.default_rng(seed)
    t16 = parse_type("fixed<16,6>")
    q = variant == "qkeras6"
    wt = parse_type("fixed<6,1>") if q else t16
    act = parse_type("ufixed<6,0,RND,SAT>") if q else t16
    b = GraphBuilder(f"svhn_{variant}")
    h = b.input("x", (32, 32, 3), t16)
    layers: dict[str, list[str]] = {}
    cin = 3
    for i, f in enumerate(FILTERS, 1):
        w = _kernel(rng, (3, 3, cin, f), 9 * cin, prune=True)
        bias = rng.uniform(-0.5, 0.5, f)
        h = b.add(f"conv{i}", "Conv", [h], attrs={"kernel": (3, 3)},
                  params={"weight": Const(wt.quantize_real(w), wt), "bias": Const(wt.quantize_real(bias), wt)})
        h = b.add(f"conv{i}_res", "Quantize", [h], attrs={"to": t16})
        h = b.add(f"relu{i}", "Relu", [h])
        h = b.add(f"relu{i}_res", "Quantize", [h], attrs={"to": act})
        h = b.add(f"pool{i}", "MaxPool", [h], attrs={"kernel": (2, 2), "strides": (2, 2)})
        if act != t16:
            h = b.add(f"pool{i}_res", "Quantize", [h], attrs={"to": t16})
        layers[f"conv{i}"] = [f"conv{i}", f"conv{i}_res"]
        layers[f"relu{i}"] = [f"relu{i}", f"relu{i}_res"]
        layers[f"pool{i}"] = [f"pool{i}"] + ([f"pool{i}_res"] if act != t16 else [])
        cin = f
    h = b.add("flatten", "Reshape", [h], attrs={"shape": (2 * 2 * cin,)})
    n_in = 2 * 2 * cin
    for i, n in enumerate(DENSE, 1):
        w = _kernel(rng, (n_in, n), n_in, prune=True)
        p = {"weight": Const(wt.quantize_real(w), wt)}
        if not q:  # BN fused into the kernel: a bias
            p["bias"] = Const(t16.quantize_real(rng.uniform(-0.5, 0.5, n)), t16)
        h = b.add(f"dense{i}", "Dense", [h], params=p)
        h = b.add(f"dense{i}_res", "Quantize", [h], attrs={"to": t16})
        if q:  # unfused BatchNormalization: hls4ml normalize layer, ap_fixed<16,6> scale and bias
            h = b.add(f"bn{i}", "Affine", [h], params={
                "scale": Const(t16.quantize_real(rng.uniform(0.5, 2.0, n)), t16),
                "bias": Const(t16.quantize_real(rng.uniform(-1.0, 1.0, n)), t16)})
            h = b.add(f"bn{i}_res", "Quantize", [h], attrs={"to": t16})
        h = b.add(f"drelu{i}", "Relu", [h])
        h = b.add(f"drelu{i}_res", "Quantize", [h], attrs={"to": act})
        n_in = n
    w = _kernel(rng, (n_in, 10), n_in, prune=False)
    h = b.add("dense_out", "Dense", [h], params={"weight": Const(t16.quantize_real(w), t16),
                                                 "bias": Const(t16.quantize_real(rng.uniform(-0.5, 0.5, 10)), t16)})
    h = b.add("dense_out_res", "Quantize", [h], attrs={"to": t16})
    h = b.add("softmax", "Softmax", [h])
    b.output(h)
    return b.build(), layers
