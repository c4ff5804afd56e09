"""hls4ml FPGA and ASIC estimates -- monotonicity properties, errors, CLI JSON, reports."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdeploy
from qdeploy.backends import asic
from qdeploy.backends.hls4ml.estimate import TOTAL_KEYS, estimate
from qdeploy.backends.hls4ml.resources import (DSP_MIN_BITS, DSP_RULES, PARTS, const_width, resolve_part,
                                               valid_reuse_factors)
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FixedType

from ..conftest import REALCASES

JSC = REALCASES / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mlp(codes, x_t: FixedType, w_t: FixedType, relu=True, conv=False):
    b = GraphBuilder("m")
    if conv:
        h = b.input("x", (6, 6, codes.shape[-2]), x_t)
        h = b.add("fc", "Conv", [h], attrs={"kernel": (1, 1)}, params={"weight": Const(codes[None, None], w_t)})
    else:
        h = b.input("x", (codes.shape[0],), x_t)
        h = b.add("fc", "Dense", [h], params={"weight": Const(codes, w_t)})
    if relu:
        h = b.add("relu", "Relu", [h])
    b.output(h)
    return b.build()


layer = st.tuples(st.integers(1, 24), st.integers(1, 12), st.integers(2, 8), st.integers(0, 2**31 - 1))


def _codes(n_in, n_out, wbits, seed):
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (wbits - 1)), (1 << (wbits - 1))
    return rng.integers(lo, hi, (n_in, n_out))


@SETTINGS
@given(layer, st.integers(1, 7), st.data(), st.booleans(), st.booleans())
def test_more_data_bits_never_fewer_luts(lay, xb, data, signed, stream):
    """Widening the input (same weights, same side of the DSP threshold) never lowers LUTs."""
    n_in, n_out, wb, seed = lay
    extra = data.draw(st.integers(1, 8 - xb))
    codes = _codes(n_in, n_out, wb, seed)
    w_t = FixedType(wb, 1)
    cfg = {"io_type": "io_stream" if stream else "io_parallel"}
    small = estimate(mlp(codes, FixedType(xb, 2, signed), w_t), cfg)["total"]
    big = estimate(mlp(codes, FixedType(xb + extra, 2, signed), w_t), cfg)["total"]
    assert xb + extra < DSP_MIN_BITS  # products stay in LUTs
    assert big["lut"] >= small["lut"]
    assert big["dsp"] >= small["dsp"]


@SETTINGS
@given(layer, st.integers(9, 16), st.integers(1, 8))
def test_more_bits_on_dsp_never_fewer_luts(lay, xb, extra):
    """Above the DSP threshold too (8-14-bit weights, so some products are on DSPs): wider inputs
    never lower LUTs or DSPs (the binding cannot change once the data is >= 9 bits)."""
    n_in, n_out, wb, seed = lay
    codes = _codes(n_in, n_out, wb + 6, seed)
    w_t = FixedType(wb + 6, 1)
    small = estimate(mlp(codes, FixedType(xb, 4), w_t))
    big = estimate(mlp(codes, FixedType(xb + extra, 4), w_t))
    assert big["total"]["lut"] >= small["total"]["lut"] and big["total"]["dsp"] >= small["total"]["dsp"]
    assert big["layers"][0]["detail"]["mults_dsp"] == small["layers"][0]["detail"]["mults_dsp"]


@SETTINGS
@given(layer, st.integers(0, 4))
def test_more_weight_bits_never_fewer_luts(lay, extra):
    """Same weight values in a wider weight type (more integer bits), below the DSP threshold."""
    n_in, n_out, wb, seed = lay
    codes = _codes(n_in, n_out, wb, seed)
    x_t = FixedType(6, 1)
    a = estimate(mlp(codes, x_t, FixedType(wb, 1)))["total"]
    b = estimate(mlp(codes, x_t, FixedType(min(wb + extra, 8), 1 + min(wb + extra, 8) - wb)))["total"]
    assert b["lut"] >= a["lut"]


@SETTINGS
@given(layer, st.integers(4, 16), st.data(), st.booleans())
def test_reuse_factor_latency_strategy_monotone(lay, xb, data, conv):
    """Larger reuse factor: never more DSPs, never lower latency, II = RF (x positions)."""
    n_in, n_out, wb, seed = lay
    codes = _codes(n_in, n_out, max(wb, 9), seed)
    g = mlp(codes, FixedType(xb, 3), FixedType(max(wb, 9), 1), conv=conv)
    r1 = data.draw(st.integers(1, n_in * n_out))
    r2 = data.draw(st.integers(r1, n_in * n_out))
    a = estimate(g, {"reuse_factor": r1})
    b = estimate(g, {"reuse_factor": r2})
    assert b["total"]["dsp"] <= a["total"]["dsp"]
    assert b["total"]["latency_cycles"] >= a["total"]["latency_cycles"]
    assert b["total"]["ii_cycles"] >= a["total"]["ii_cycles"]
    fc = next(r for r in b["layers"] if r["name"] == "fc")
    assert fc["ii_cycles"] == r2 * (36 if conv else 1)


@SETTINGS
@given(st.integers(1, 24), st.integers(1, 12), st.integers(0, 2**31 - 1), st.data())
def test_reuse_factor_resource_strategy_monotone(n_in, n_out, seed, data):
    codes = _codes(n_in, n_out, 12, seed)
    g = mlp(codes, FixedType(12, 3), FixedType(12, 1))
    valid = valid_reuse_factors(n_in, n_out)
    r1 = data.draw(st.sampled_from(valid))
    r2 = data.draw(st.sampled_from([r for r in valid if r >= r1]))
    a = estimate(g, {"strategy": "Resource", "reuse_factor": r1})["total"]
    b = estimate(g, {"strategy": "Resource", "reuse_factor": r2})["total"]
    assert b["latency_cycles"] >= a["latency_cycles"] and b["ii_cycles"] == r2
    if r1 > 1:  # RF 1 -> 2 switches from folded constants to a weight ROM (A8); from RF 2 up DSPs only fall
        assert b["dsp"] <= a["dsp"]


def test_resource_rf1_folds_constants_rf2_reads_a_rom():
    """A8: at RF 1 zero / +-2**k / narrow weights are free; at RF > 1 every MAC lane is a general multiplier."""
    codes = np.zeros((8, 4), dtype=np.int64)
    codes[0] = [300, 0, 4, -3]  # one DSP-wide constant, a power of two, a narrow one
    g = mlp(codes, FixedType(12, 3), FixedType(12, 1), relu=False)
    rf1 = estimate(g, {"strategy": "Resource", "reuse_factor": 1})["total"]
    rf2 = estimate(g, {"strategy": "Resource", "reuse_factor": 2})["total"]
    rf8 = estimate(g, {"strategy": "Resource", "reuse_factor": 8})["total"]
    assert (rf1["dsp"], rf2["dsp"], rf8["dsp"]) == (1, 16, 4)


def test_constant_rules_zero_and_power_of_two_are_free():
    x_t = FixedType(16, 6)
    w_t = FixedType(16, 6)
    free = mlp(np.array([[0, 1, -2, 1024], [4, 0, 0, -8]]), x_t, w_t, relu=False)
    est = estimate(free)
    d = est["layers"][0]["detail"]
    assert (d["mults_zero"], d["mults_shift"], d["mults_lut"], d["mults_dsp"]) == (3, 5, 0, 0)
    assert est["total"]["dsp"] == 0


def test_const_width_is_twos_complement_minimum():
    codes = np.array([0, 1, -1, 5, -8, -9, 255, 256, -256, -257])
    assert const_width(codes).tolist() == [1, 2, 1, 4, 4, 5, 9, 10, 9, 10]


def test_dsp_rule_narrowed_constant_and_narrower_operand_decide():
    """A3 ``vivado``: a non-free product is on a DSP iff data and the *narrowed* constant are both >= 9 bits."""
    w_t = FixedType(16, 6)  # declared 16 bits: hls4ml's literal rule would put every product on a DSP
    codes = np.array([[11, 300], [-257, 200]])  # narrowed widths 5, 10, 10, 9
    viv = {"dsp_rule": "vivado"}
    d = estimate(mlp(codes, FixedType(16, 6), w_t, relu=False), viv)["layers"][0]["detail"]
    assert (d["mults_lut"], d["mults_dsp"]) == (1, 3)
    e = estimate(mlp(codes, FixedType(16, 6), w_t, relu=False), {"dsp_rule": "hls4ml_weight"})
    assert e["layers"][0]["detail"]["mults_dsp"] == 4
    narrow_data = estimate(mlp(codes, FixedType(8, 3), w_t, relu=False), viv)
    assert narrow_data["total"]["dsp"] == 0 and narrow_data["layers"][0]["detail"]["mults_lut"] == 4
    with pytest.raises(QDeployError, match="dsp_rule must be one of csd_wider"):
        estimate(mlp(codes, FixedType(16, 6), w_t), {"dsp_rule": "nope"})


def test_default_dsp_rule_csd_digits_and_wider_operand_decide():
    """A3 ``csd_wider`` (default): >= 3 CSD digits and the wider operand >= 9 bits -> DSP."""
    assert DSP_RULES[0] == "csd_wider" and DSP_MIN_BITS == 9
    # 11 = 1011b -> CSD 10-10-1 (3 digits); 100 = 64+32+4 (3 digits); 5 = 101b (2 digits)
    w_t = FixedType(16, 6)
    codes = np.array([[11, 100], [5, 4]])  # 4: power of two (free); 5: two digits (one adder)
    d = estimate(mlp(codes, FixedType(8, 3), w_t, relu=False))["layers"][0]["detail"]
    assert d["mults_dsp"] == 2 and d["mults_lut"] == 1  # wider operand (16-bit weight type) decides
    small = estimate(mlp(codes, FixedType(8, 3), FixedType(8, 3), relu=False))
    assert small["total"]["dsp"] == 0  # both operands < 9 bits: everything in fabric


@pytest.mark.parametrize("x_bits,code,part,dsps", [
    (16, 300, "xcvu9p", 1),          # 16 x 10 bits: one DSP48E2 (27x18)
    (30, 300, "xcvu9p", 2),          # 30 x 10: ceil(30/27) * ceil(10/18) = 2
    (20, 2 ** 18 + 3, "xcvu9p", 2),  # 20 x 20: ceil(20/27) * ceil(20/18) = 2
    (26, 300, "xcvu9p", 1),          # fits 27 bits on UltraScale+
    (26, 300, "xc7z020", 2),         # ... but not the 25-bit DSP48E1 port of the Zynq-7000
])
def test_dsps_per_product_follow_the_dsp_port_widths(x_bits, code, part, dsps):
    g = mlp(np.array([[code]]), FixedType(x_bits, 8), FixedType(24, 20), relu=False)
    assert estimate(g, {"part": part, "dsp_rule": "vivado"})["total"]["dsp"] == dsps  # narrowed constant


@SETTINGS
@given(layer, st.integers(1, 4), st.integers(9, 16))
def test_fewer_weight_fraction_bits_never_more_dsps(lay, cut, xb):
    """The same real weights rounded to fewer fraction bits (16-bit -> 14-bit PTQ) never use more DSPs:
    narrowed constants only shrink (A3)."""
    n_in, n_out, _, seed = lay
    real = np.random.default_rng(seed).normal(0, 1.5, (n_in, n_out))
    fine, coarse = FixedType(16, 6), FixedType(16 - cut, 6)
    a = estimate(mlp(fine.quantize_real(real), FixedType(xb, 4), fine))["total"]
    b = estimate(mlp(coarse.quantize_real(real), FixedType(xb, 4), coarse))["total"]
    assert b["dsp"] <= a["dsp"]


def test_valid_reuse_factors_match_hls4ml():
    from hls4ml.backends import get_backend
    be = get_backend("Vivado")
    for n_in, n_out in ((16, 64), (64, 32), (32, 5), (9, 8), (7, 3)):
        assert valid_reuse_factors(n_in, n_out) == be.get_valid_reuse_factors(n_in, n_out)


def test_errors_unknown_part_illegal_rf_unsupported_op():
    g = mlp(_codes(16, 64, 6, 0), FixedType(8, 2), FixedType(6, 1))
    with pytest.raises(QDeployError, match="unknown FPGA part 'xc9999'.*xcvu9p.*xc7z020"):
        estimate(g, {"part": "xc9999"})
    # a reuse factor hls4ml cannot build becomes the one it builds (its own closest rule), reported
    from hls4ml.backends import get_backend
    be = get_backend("Vivado")
    r = estimate(g, {"strategy": "Resource", "reuse_factor": 7})
    assert r["reuse_factors"]["fc"]["requested"] == 7
    assert r["reuse_factors"]["fc"]["used"] == be.get_closest_reuse_factor(be.get_valid_reuse_factors(16, 64), 7) == 8
    assert any("fc 7 -> 8" in w for w in r["warnings"])
    assert estimate(g, {"reuse_factor": 5000})["reuse_factors"]["fc"]["used"] == 1024
    with pytest.raises(QDeployError, match=r"node 'fc'.*reuse factor must be an integer >= 1"):
        estimate(g, {"reuse_factor": {"fc": 0}})
    bad = g.with_(nodes=[n.replace(op="Gelu") if n.name == "relu" else n for n in g.nodes])
    with pytest.raises(QDeployError, match=r"node 'relu'.*'Gelu'.*supported ops: Dense, Conv"):
        estimate(bad)
    with pytest.raises(QDeployError, match=r"node 'relu'.*'Gelu'.*supported ops"):
        asic.estimate(bad)
    with pytest.raises(QDeployError, match="technology node 90"):
        asic.estimate(g, {"node_nm": 90})


@pytest.mark.parametrize("name,key", [("vu9p", "xcvu9p"), ("xcvu9p-flga2104-2L-e", "xcvu9p"), ("VU13P", "xcvu13p"),
                                      ("xcku115-flvb2104-2-i", "xcku115"), ("Alveo U250", "xcu250"),
                                      ("zcu102", "xczu9eg"), ("xczu9eg-ffvb1156-2-e", "xczu9eg"),
                                      ("pynq-z2", "xc7z020"), ("xc7z020clg400-1", "xc7z020")])
def test_parts(name, key):
    assert resolve_part(name)[0] == key
    assert set(PARTS) == {"xcvu9p", "xcvu13p", "xcku115", "xcu250", "xczu9eg", "xc7z020"}


def test_asic_scales_with_node_and_bits():
    codes = _codes(32, 16, 6, 1)
    g = mlp(codes, FixedType(8, 2), FixedType(6, 1))
    t = {nm: asic.estimate(g, {"node_nm": nm})["total"] for nm in (65, 45, 28)}
    assert t[65]["area_mm2"] > t[45]["area_mm2"] > t[28]["area_mm2"] > 0
    assert t[65]["energy_nj"] > t[45]["energy_nj"] > t[28]["energy_nj"] > 0
    wide = asic.estimate(mlp(codes, FixedType(12, 2), FixedType(6, 1)))["total"]
    assert wide["area_mm2"] > t[65]["area_mm2"] and wide["energy_nj"] > t[65]["energy_nj"]
    assert abs(t[65]["power_mw"] - t[65]["energy_nj"] * 40) < 1e-9  # 40 MHz, II = 1


@pytest.mark.skipif(not JSC.exists(), reason="needs ../shared/realcases")
@pytest.mark.parametrize("target", ["hls4ml", "asic"])
def test_cli_json_keys(target):
    from typer.testing import CliRunner
    from qdeploy.cli import app
    args = ["estimate", str(JSC), "--target", target, "--json"]
    if target == "hls4ml":
        args += ["--part", "vu9p", "--clock-period", "5", "--reuse-factor", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    keys = set(TOTAL_KEYS) | ({"area_mm2", "power_mw", "energy_nj"} if target == "asic" else set())
    assert keys <= set(doc["total"])
    assert doc["layers"] and all(keys <= set(r) for r in doc["layers"])
    if target == "hls4ml":
        assert doc["total"]["ii_cycles"] == 2 and doc["total"]["latency_ns"] == 5 * doc["total"]["latency_cycles"]


@pytest.mark.skipif(not JSC.exists(), reason="needs ../shared/realcases")
def test_cli_zero_settings_are_errors_and_overfull_parts_warn():
    """0 is a value, never 'use the default': a zero reuse factor or clock period is refused; the
    text table states the part utilization and warns when the design does not fit."""
    from typer.testing import CliRunner
    from qdeploy.cli import app
    run = CliRunner().invoke
    for args, msg in ((["--reuse-factor", "0"], "reuse factor must be an integer >= 1"),
                      (["--clock-period", "0"], "clock period must be a positive number of ns"),
                      (["--target", "asic", "--clock-period", "0"], "clock period must be a positive number of ns"),
                      (["--clock-period", "nan"], "clock period must be a positive number of ns"),
                      (["--target", "asic", "--clock-period", "inf"], "clock period must be a positive number of ns")):
        r = run(app, ["estimate", str(JSC), *args])
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    small = run(app, ["estimate", str(JSC), "--part", "pynq-z2"])
    assert small.exit_code == 0 and "utilization of PYNQ-Z2" in small.output
    assert "WARNING: the design exceeds the part PYNQ-Z2 (Zynq-7000 Z-7020): LUT" in small.output
    big = run(app, ["estimate", str(JSC), "--part", "vu9p"])
    assert "utilization of" in big.output and "exceeds the part" not in big.output


@pytest.mark.skipif(not JSC.exists(), reason="needs ../shared/realcases")
def test_cli_errors_are_one_line():
    from typer.testing import CliRunner
    from qdeploy.cli import app
    res = CliRunner().invoke(app, ["estimate", str(JSC), "--strategy", "Resource", "--reuse-factor", "7"])
    assert res.exit_code == 0 and "WARNING: reuse factor adjusted to what hls4ml can build" in res.output
    assert "MatMul_0 7 -> 8" in res.output
    res = CliRunner().invoke(app, ["estimate", str(JSC), "--part", "nope"])
    assert res.exit_code == 2 and "known parts" in res.output


@pytest.mark.skipif(not JSC.exists(), reason="needs ../shared/realcases")
def test_api_estimate_jet_tagger():
    """The jet tagger through the API (its < 10 ms timing is printed by benchmarks/estimate_vs_published.py)."""
    from qdeploy.passes import PassManager, default_pipeline
    g = PassManager(default_pipeline()).run(qdeploy.load(str(JSC)))
    est = estimate(g)
    assert est["total"]["lut"] > 0 and est["total"]["dsp"] >= 0
    assert "measured against published post-HLS reports" in est["note"] and "jet tagger" in est["note"]
    a = qdeploy.api.estimate(str(JSC), "asic")
    assert a["total"]["area_mm2"] > 0 and "measured on the ECON-T encoder" in a["note"]


def test_compile_report_carries_estimate(tmp_path, rng):
    g = mlp(rng.integers(-32, 32, (16, 8)), parse_type("fixed<8,3>"), parse_type("fixed<6,1>"))
    res = qdeploy.compile(g, "reference", tmp_path / "out", golden=np.zeros((4, 16)))
    est = res.report["estimate"]
    assert est["target"] == "hls4ml" and set(TOTAL_KEYS) <= set(est["total"]) and est["total"]["lut"] > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["estimate"]["total"] == est["total"]


def test_asic_tmr_triplicates_registers():
    """B8: with register TMR every flip-flop becomes three plus three voters, all clocked."""
    from qdeploy.backends.asic.cells import GE_DFF, GE_MAJ3
    g = mlp(_codes(32, 16, 6, 2), FixedType(8, 2), FixedType(6, 1))
    a = asic.estimate(g)["total"]
    b = asic.estimate(g, {"tmr": "registers"})["total"]
    assert b["ff"] == 3 * a["ff"]
    assert b["ge"] - a["ge"] == pytest.approx(a["ff"] * (3 * (GE_DFF + GE_MAJ3) - GE_DFF))
    assert b["area_mm2"] > a["area_mm2"] and b["energy_nj"] > a["energy_nj"] and b["power_mw"] > a["power_mw"]
    with pytest.raises(QDeployError, match="tmr must be one of none, registers"):
        asic.estimate(g, {"tmr": "full"})


def test_tables_print_no_none():
    from qdeploy.backends.hls4ml.estimate import format_table
    g = mlp(_codes(8, 4, 6, 3), FixedType(8, 2), FixedType(6, 1))
    a = format_table(asic.estimate(g))
    assert "None" not in a and "area_mm2" in a and "lut" not in a.split("\n")[0]
    f = format_table(estimate(g))
    assert "lut" in f.split("\n")[0] and "area_mm2" not in f
    est = estimate(g)
    est["layers"][0]["lut"] = None
    assert "None" not in format_table(est) and " - " in format_table(est)


REFS = REALCASES.parent / "refs"


def _bench(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (REFS / "asic_econt.csv").exists(), reason="needs ../shared/refs")
def test_asic_note_states_the_measured_error():
    """The note every ASIC result carries quotes the ratios the ECON-T benchmark measures."""
    import csv
    ref = next(csv.DictReader(open(REFS / "asic_econt.csv")))
    g = _bench("asic_econt").econt_graph()
    for tmr in ("none", "registers"):
        est = asic.estimate(g, {"node_nm": 65, "clock_mhz": float(ref["clock_mhz"]), "tmr": tmr})
        t = est["total"]
        area = t["area_mm2"] / float(ref["area_mm2"])
        power = t["power_mw"] / float(ref["power_mw"])
        energy = t["energy_nj"] / float(ref["energy_per_inference_nj"])
        assert f"area {area:.2f}x, power {power:.2f}x, energy {energy:.2f}x with tmr={tmr}" in est["note"]


@pytest.mark.skipif(not JSC.exists(), reason="needs ../shared/realcases")
def test_fpga_note_states_the_measured_error():
    """The note every hls4ml estimate carries quotes the ratios estimate_vs_published.py measures
    against ``benchmarks/refs/hls4ml_published.csv`` (jet tagger io_parallel and SVHN io_stream totals)."""
    import csv
    b = _bench("estimate_vs_published")
    svhn = _bench("hls4ml_svhn")
    pynq_g, pynq_layers, pynq_rf = _bench("hls4ml_pynq_cnn").pynq_cnn_graph()
    rows = list(csv.DictReader(open(b.REFS)))
    jet = {"16-bit PTQ": (b.ptq_graph(16), "fixed<16,6>"), "14-bit PTQ": (b.ptq_graph(14), "fixed<14,6>"),
           "6-bit QAT (QKeras)": (b.qat_graph(), "fixed<16,6>")}
    cfg = {"part": "xcvu9p", "clock_period": 5.0, "reuse_factor": 1, "softmax_on_device": True}
    scfg = {"part": "xcu250", "clock_period": 5.0, "io_type": "io_stream", "softmax_on_device": True,
            "accum_type": "fixed<16,6>", "casts": "result_type"}
    pcfg = {"part": "pynq-z2", "clock_period": 5.0, "io_type": "io_stream", "strategy": "Resource",
            "softmax_on_device": True, "accum_type": "fixed<14,6>", "reuse_factor": pynq_rf, "casts": "result_type"}
    rat = {"LUT": [], "FF": [], "DSP": [], "stream LUT": [], "stream FF": [], "resource LUT": [], "resource FF": []}
    note, hits, cache = None, 0, {}
    for r in rows:
        if r["family"] == "jet_tagger_mlp":
            g, acc = jet[r["design"]]
            key, cfg_r, layers = r["design"], {**cfg, "accum_type": acc}, None
            keys = (("LUT", "lut"), ("FF", "ff"), ("DSP", "dsp"))
        elif r["family"] == "svhn_cnn_stream":
            g, layers = svhn.svhn_graph(r["design"])
            key, cfg_r = r["design"], scfg
            keys = (("stream LUT", "lut"), ("stream FF", "ff"))
        else:
            g, layers, key, cfg_r = pynq_g, pynq_layers, "pynq", pcfg
            keys = (("resource LUT", "lut"), ("resource FF", "ff"))
        if key not in cache:
            cache[key] = estimate(g, cfg_r)
        est = cache[key]
        ours = b._ours_for(est, layers, r["scope"])
        hits += abs(ours["lut"] / float(r["lut"]) - 1) <= 0.25 and abs(ours["ff"] / float(r["ff"]) - 1) <= 0.25
        if r["scope"] == "design":
            for k, col in keys:
                rat[k].append(f"{est['total'][col] / float(r[col]):.2f}")
        note = est["note"]
    assert f"{hits} of {len(rows)} reference rows within 25% on LUT and FF" in note, (hits, note)
    assert len(rat["LUT"]) == 3 and len(rat["stream LUT"]) == 2 and len(rat["resource LUT"]) == 1
    for k, v in rat.items():
        assert f"{k} {'/'.join(v)}" in note, (k, v, note)


def test_unsigned_data_needs_one_more_dsp_port_bit():
    """The DSP48E2 ports are signed 27x18: 27-bit unsigned data times a 10-bit constant needs 2 DSPs."""
    signed = mlp(np.array([[300]]), FixedType(27, 8), FixedType(24, 20), relu=False)
    unsigned = mlp(np.array([[300]]), FixedType(27, 8, False), FixedType(24, 20), relu=False)
    viv = {"dsp_rule": "vivado"}  # the constant at its narrowed 10 bits
    assert estimate(signed, viv)["total"]["dsp"] == 1 and estimate(unsigned, viv)["total"]["dsp"] == 2


def test_host_input_quantizer_costs_nothing(tmp_path):
    """A non-power-of-two input Quant on a float input becomes a grid Quantize + MultiThreshold that
    the hls4ml backend runs on the host (partition prologue): the estimate lists both as host rows
    with no LUTs (it once priced the MultiThreshold at ~1.5M LUTs and warned the design did not fit)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import qdeploy.api as api
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(1 / 3), "s"), numpy_helper.from_array(np.float32(0), "z"),
             numpy_helper.from_array(np.float32(8), "b8"), numpy_helper.from_array(np.float32(0.125), "ws"),
             numpy_helper.from_array(rng.integers(-8, 8, (16, 4)).astype(np.float32) * 0.125, "w")]
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b8"], ["xq"], name="qin", domain="qonnx.custom_op.general",
                              signed=1, narrow=0, rounding_mode="ROUND"),
             helper.make_node("Quant", ["w", "ws", "z", "b8"], ["wq"], name="qw", domain="qonnx.custom_op.general",
                              signed=1, narrow=0, rounding_mode="ROUND"),
             helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("qonnx.custom_op.general", 1)])
    onnx.save(m, tmp_path / "m.onnx")
    est = api.estimate(str(tmp_path / "m.onnx"), "hls4ml")
    rows = {r["name"]: r for r in est["layers"]}
    mt = [r for r in est["layers"] if r["op"] == "MultiThreshold"]
    assert mt and all(r["host"] and r["lut"] == 0 for r in mt)
    assert est["total"]["lut"] == sum(r["lut"] for r in est["layers"] if not r["host"])
    assert est["total"]["utilization_pct"]["lut"] < 5 and not est["warnings"]
    assert rows
