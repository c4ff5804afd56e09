"""The corpus of real model families (tests/corpus/registry.py), compiled and judged against
their source (tests/corpus/runner.py).

Default run: every model on ``reference`` and ``tvm-llvm``, and a handful on ``hls4ml``.
``-m slow``: hls4ml on every other model, and reference compiling each Brevitas module itself
(the default run compiles the graph imported once from it: Brevitas' dynamo export is the
slowest step; the artifact is judged against the module either way).  Outcomes: exact, exact up to float32 ties of the
source (``ties``: the float64 source agrees with us), clear error, FAIL (runner.py).  Each case
asserts that the outcome is not FAIL
(unless listed in :data:`KNOWN_FAILURES` with the reason, and then that it still fails the
known way), and that the models listed in :data:`MUST_BE_EXACT` stay exact: a regression fails.

The table of outcomes: ``.venv/bin/python -m tests.corpus.table`` (docs/corpus.md).
"""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler.errors import CompileError, UnsupportedError

from .registry import CORPUS
from .runner import ERROR, EXACT, FAIL, classify_error, compare_to_source, run_one

NAMES = [e.name for e in CORPUS]

#: (model, target) -> (a substring of the FAIL detail, why it fails / where it is tracked).
#: A listed case may also pass (fixed by a merged branch): then delete its line.
KNOWN_FAILURES: dict[tuple[str, str], tuple[str, str]] = {
}

#: models exact on reference and tvm-llvm in the last table (docs/corpus.md): they must stay exact
#: on those targets (not become an error or a FAIL).  The others: see KNOWN_FAILURES and the table.
MUST_BE_EXACT = {
    "float_bn_conv_relu_b8",
    "float_chw_trap_b6",
    "float_cnn1d_b3",
    "float_cnn2d_b7",
    "float_mlp1d_b5",
    "float_mlp_b2",
    "float_mlp_b4",
    "float_residual_b8",
    "float_two_heads_b6",
    "ort_chw_trap_u8",
    "ort_cnn1d_u8",
    "ort_cnn2d_bn_gap_s8",
    "ort_cnn2d_u8",
    "ort_mlp_s8",
    "ort_mlp_u8",
    "perchannel_cnn1d_b4",
    "perchannel_cnn2d_b3",
    "perchannel_cnn2d_b7",
    "perchannel_depthwise_b6",
    "perchannel_mlp1d_b5",
    "perchannel_mlp_b2",
    "perchannel_mlp_b8",
    "pot_adaptive_avgpool_b6",
    "pot_avgpool2_b6",
    "pot_avgpool3_b6",
    "pot_bn_before_ident_b6",
    "pot_bn_conv_relu_b6",
    "pot_bn_end_b6",
    "pot_chw_trap_b6",
    "pot_chw_trap_stride_b5",
    "pot_cl_trap_1d_b6",
    "pot_cnn1d_b6",
    "pot_cnn2d_b4",
    "pot_cnn2d_b8",
    "pot_depthwise_b6",
    "pot_mlp1d_b5",
    "pot_mlp_b2",
    "pot_mlp_b3",
    "pot_mlp_b4",
    "pot_mlp_b5",
    "pot_mlp_b6",
    "pot_mlp_b7",
    "pot_mlp_b8",
    "pot_mlp_float_bias_b6",
    "pot_mlp_raw_logits_b6",
    "pot_residual_b6",
    "pot_trunc_adaptive_avgpool_b6",
    "pot_trunc_avgpool_b6",
    "pot_trunc_avgpool_round_b6",
    "pot_two_heads_b6",
    "pot_upsample_b6",
    "zeropoint_cnn1d_b6",
    "zeropoint_mlp_b2",
    "zeropoint_cnn2d_b4",
    "zeropoint_cnn2d_b8",
    "zeropoint_mlp1d_b3",
    "zeropoint_mlp_b5",
    "zeropoint_mlp_b7",
}

#: the hls4ml cases of the default run (C-simulation compiles take 10-20 s each)
HLS4ML_DEFAULT = ("pot_mlp_b4", "pot_cnn2d_b4", "pot_cnn1d_b6", "pot_chw_trap_b6",
                  "pot_bn_conv_relu_b6")  # Conv -> BN -> QuantReLU: the BN folds into a MultiThreshold


def _check(name: str, target: str, from_module: bool = False):
    o = run_one(name, target, from_module=from_module)
    known = KNOWN_FAILURES.get((name, target))
    if o.kind == FAIL:
        assert known is not None, f"{name} on {target}: FAIL: {o.detail}"
        assert known[0] in o.detail, f"{name} on {target} fails another way than known ({known[1]}): {o.detail}"
    if name in MUST_BE_EXACT and target in ("reference", "tvm-llvm"):
        assert o.kind == EXACT, f"{name} on {target} was exact and is now {o.kind}: {o.detail}"
    return o


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
@pytest.mark.parametrize("name", NAMES)
def test_corpus_reference_and_tvm(name, target):
    _check(name, target)


@pytest.mark.parametrize("name", HLS4ML_DEFAULT)
def test_corpus_hls4ml_handful(name):
    _check(name, "hls4ml")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in HLS4ML_DEFAULT])
def test_corpus_hls4ml_all(name):
    _check(name, "hls4ml")


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in CORPUS if "ort-qdq" not in e.tags])
def test_corpus_reference_compiling_the_module_itself(name):
    """As the table does: ``compile(module)`` (a second Brevitas export), whose report checks the module."""
    _check(name, "reference", from_module=True)


def test_corpus_covers_the_families():
    """At least 40 models; every Brevitas quantizer family at every width 2..8; the layer
    patterns and the onnxruntime QDQ family present; unique names; known failures name real cases."""
    assert len(CORPUS) >= 40 and len(set(NAMES)) == len(NAMES)
    tags = [set(e.tags) for e in CORPUS]
    for fam in ("pot", "float", "perchannel", "zeropoint"):
        widths = {int(t.split(":")[1]) for s in tags if f"quant:{fam}" in s for t in s if t.startswith("bits:")}
        assert widths == set(range(2, 9)), (fam, widths)
    everything = set().union(*tags)
    for pattern in ("conv1d", "conv2d", "depthwise", "bn-conv-relu", "bn-before-identity", "bn-end", "residual-add",
                    "upsample-nearest", "maxpool", "avgpool", "adaptive-avgpool", "trunc-avgpool", "two-heads",
                    "C==H==W", "quant:qdq-int8-perchannel", "data:signals", "data:digits"):
        assert pattern in everything, pattern
    assert {n for n, _ in KNOWN_FAILURES} <= set(NAMES) and MUST_BE_EXACT <= set(NAMES)


def test_classifier_tells_clear_errors_from_failures():
    assert classify_error(UnsupportedError("Resize is not supported", "up1")).kind == ERROR
    assert classify_error(UnsupportedError("something is not supported")).kind == FAIL  # names no node
    try:
        try:
            raise TypeError("bad operand")
        except TypeError as e:
            raise CompileError("tvm-llvm compile failed: TypeError: bad operand", "g") from e
    except CompileError as e:
        wrapped = classify_error(e)
    assert wrapped.kind == FAIL and "wrapped library error" in wrapped.detail
    lib = classify_error(ValueError("shapes (3,) and (4,) not aligned"))
    assert lib.kind == FAIL and lib.detail.startswith("ValueError: shapes")


def test_source_comparison_sees_one_lsb_and_tells_float32_ties():
    want = [np.arange(12, dtype=np.float32).reshape(3, 4) * np.float32(2.0 ** -5)]
    got = [want[0].astype(np.float64)]
    c = compare_to_source(got, want)
    assert (c["differing_samples"], c["differing_values"], c["max_abs_error"]) == (0, 0, 0.0)
    got[0][1, 2] += 2.0 ** -5
    c = compare_to_source(got, want)
    assert (c["differing_samples"], c["differing_values"], c["max_abs_error"]) == (1, 1, 2.0 ** -5)
    # the float64 source gives our value there: a float32 tie of the source; else it is not
    w64 = [want[0].astype(np.float64)]
    assert compare_to_source(got, want, want64=w64)["ties"] == 0
    w64[0][1, 2] += 2.0 ** -5
    assert compare_to_source(got, want, want64=w64)["ties"] == 1
    assert compare_to_source([want[0][:, :3]], want)["differing_samples"] == 3  # a shape mismatch fails every sample
    # an unquantized float output: a float32 reordering is tolerated, a real difference is not
    w = [np.full((2, 3), 10.0, np.float32)]
    assert compare_to_source([w[0] + 1e-6], w, floats=[True])["differing_samples"] == 0
    assert compare_to_source([w[0] + 1e-2], w, floats=[True])["differing_samples"] == 2
