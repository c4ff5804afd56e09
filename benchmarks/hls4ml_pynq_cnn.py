"""IR graph of a public hls4ml io_stream CNN built with the Resource strategy for a PYNQ-Z2, for
``benchmarks/estimate_vs_published.py`` (family ``pynq_cnn_resource``).

Source: GitHub ``kendermag/hls4ml-tutorial`` commit 07807f8, project
``TUDATALLAPOT_QUANTIZED_VER0_312_FULL`` (a student's QKeras model, not a paper; its Vivado HLS
2019.1 report ``myproject_prj/solution1/syn/report/myproject_csynth.rpt``, xc7z020, 5 ns).  Its
``hls4ml_config.yml``, ``firmware/defines.h`` and ``firmware/parameters.h`` give every shape,
type, reuse factor and the number of zero weights per layer (``n_zeros``):

    input 512x16x1 ap_fixed<16,6>
    -> 4 x [zero-pad 1 + Conv2D 3x3 (8, 10, 10, 12 filters; ap_fixed<6,1> weights and biases,
            ap_fixed<14,6> accumulator and result) + ReLU -> ap_fixed<6,1,AP_RND,AP_SAT>],
       MaxPool 2x2 after the 1st and 2nd, 4x4 after the 4th (pool results ap_fixed<16,6>)
    -> flatten 384 -> Dense 5 (ap_fixed<6,1>, no bias) + BN + ReLU -> Dense 16 (same) + BN + ReLU
    -> Dense 3 (ap_fixed<16,6>) -> Softmax
    Resource strategy; reuse factors 18, 18, 15, 15 (convs), 16, 20, 16 (dense).

The weight values are not used: stand-ins (Keras ``lecun_uniform``, quantized to the published
type) with exactly the published number of zeros per layer, fixed seed.  With the Resource
strategy every non-zero lane is a general multiplier, so the DSP/LUT split depends only on the
operand widths, not on these values.  hls4ml of that time put a ``repack_stream`` layer after the
flatten (6,831 LUT, 6,065 FF, 1 BRAM in the report); hls4ml 1.3, which qdeploy targets and the
estimator models, has none.
"""
from __future__ import annotations

import numpy as np

#: (filters, n_zeros, reuse factor, pool after) of the four convolutions (parameters.h).
CONVS = ((8, 36, 18, 2), (10, 373, 18, 2), (10, 475, 15, 0), (12, 596, 15, 4))
#: (units, n_zeros, reuse factor, batchnorm+relu after) of the three dense layers.
DENSES = ((5, 1175, 16, True), (16, 40, 20, True), (3, 24, 16, False))


def _codes(rng, shape, fan_in, n_zeros, t):
    lim = np.sqrt(3.0 / fan_in)
    codes = t.quantize_real(rng.uniform(-lim, lim, shape)).reshape(-1)
    codes = np.where(codes == 0, np.where(rng.random(codes.size) < 0.5, -1, 1), codes)
    order = np.argsort(np.abs(codes) + rng.random(codes.size) * 0.5, kind="stable")
    codes[order[:n_zeros]] = 0
    return codes.reshape(shape)


def pynq_cnn_graph(seed: int = 0):
    """The PYNQ-Z2 CNN as an IR graph.

    Returns ``(graph, layers, reuse_factors)``: ``layers`` maps the report's instance names
    (``conv1``..``conv4``, ``dense1``, ``pool1``) to the IR node names of that hls4ml layer,
    ``reuse_factors`` is the per-node reuse factor mapping to pass to the estimator.
    """
    from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
    rng = np.random.default_rng(seed)
    t16, t14 = parse_type("fixed<16,6>"), parse_type("fixed<14,6>")
    w6 = parse_type("fixed<6,1>")
    act = parse_type("fixed<6,1,RND,SAT>")
    b = GraphBuilder("pynq_cnn")
    h = b.input("x", (512, 16, 1), t16)
    layers: dict[str, list[str]] = {}
    rfs: dict[str, int] = {}
    cin = 1
    for i, (f, nz, rf, pool) in enumerate(CONVS, 1):
        w = _codes(rng, (3, 3, cin, f), 9 * cin, nz, w6)
        bias = w6.quantize_real(rng.uniform(-0.25, 0.25, f))
        h = b.add(f"conv{i}", "Conv", [h], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
                  params={"weight": Const(w, w6), "bias": Const(bias, w6)})
        h = b.add(f"conv{i}_res", "Quantize", [h], attrs={"to": t14})
        h = b.add(f"relu{i}", "Relu", [h])
        h = b.add(f"relu{i}_res", "Quantize", [h], attrs={"to": act})
        layers[f"conv{i}"] = [f"conv{i}", f"conv{i}_res"]
        rfs[f"conv{i}"] = rf
        if pool:
            h = b.add(f"pool{i}", "MaxPool", [h], attrs={"kernel": (pool, pool), "strides": (pool, pool)})
            h = b.add(f"pool{i}_res", "Quantize", [h], attrs={"to": t16})
            layers[f"pool{i}"] = [f"pool{i}", f"pool{i}_res"]
        cin = f
    h = b.add("flatten", "Reshape", [h], attrs={"shape": (32 * 1 * cin,)})
    n_in = 32 * cin
    for i, (n, nz, rf, bn) in enumerate(DENSES, 1):
        wt = w6 if bn else t16
        p = {"weight": Const(_codes(rng, (n_in, n), n_in, nz, wt), wt)}
        if not bn:
            p["bias"] = Const(t16.quantize_real(rng.uniform(-0.5, 0.5, n)), t16)
        h = b.add(f"dense{i}", "Dense", [h], params=p)
        h = b.add(f"dense{i}_res", "Quantize", [h], attrs={"to": t14 if bn else t16})
        layers[f"dense{i}"] = [f"dense{i}", f"dense{i}_res"]
        rfs[f"dense{i}"] = rf
        if bn:
            h = b.add(f"bn{i}", "Affine", [h], params={
                "scale": Const(t16.quantize_real(rng.uniform(0.5, 2.0, n)), t16),
                "bias": Const(t16.quantize_real(rng.uniform(-1.0, 1.0, n)), t16)})
            h = b.add(f"bn{i}_res", "Quantize", [h], attrs={"to": t14})
            h = b.add(f"drelu{i}", "Relu", [h])
            h = b.add(f"drelu{i}_res", "Quantize", [h], attrs={"to": act})
        n_in = n
    h = b.add("softmax", "Softmax", [h])
    b.output(h)
    return b.build(), layers, rfs
