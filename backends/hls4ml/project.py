"""Making the written hls4ml project one an FPGA engineer can take to Vitis HLS as it is: the
testbench data ``tb_data/`` filled from the golden set, ``hls4ml_config.yml``'s ``OutputDir``
pointing at the final project folder, and a ``README.md`` saying how to run it and what its ports are.

hls4ml's generated testbench (``myproject_test.cpp``, hls4ml 1.3 ``templates/vivado/myproject_test.cpp``)
reads ``tb_data/tb_input_features.dat`` (one line per sample: every device input's values,
flattened in C order of the device layout, inputs one after another, parsed with ``atof`` into a
``std::vector<float>`` and cast into the input type by ``nnet::copy_data``) and
``tb_data/tb_output_predictions.dat`` (one line per sample, the expected outputs, printed beside
the results), and writes ``tb_data/csim_results.log`` with ``nnet::print_result``: one line per
output per sample.  The values written here are the *device* inputs and outputs of the reference
interpreter (after the host prologue: the input quantizers; before the host epilogue: a float
output scale), so ``vitis_hls -f build_prj.tcl "csim=1"`` reproduces the golden outputs bit for bit
(checked by ``tests/backends/test_hls4ml_project.py`` with g++).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType

TB_INPUT = "tb_data/tb_input_features.dat"
TB_OUTPUT = "tb_data/tb_output_predictions.dat"


def _real(graph: Graph, name: str, codes) -> np.ndarray:
    t = graph.value(name).dtype
    a = np.asarray(codes)
    return a.astype(np.float64) * 2.0 ** -t.frac_bits if isinstance(t, FixedType) else a.astype(np.float64)


def _line(parts) -> str:
    return " ".join(repr(float(x)) for p in parts for x in np.ravel(p)) + "\n"


def write_tb_data(prj: Path, info: dict, graph: Graph, values: dict) -> dict:
    """Write ``prj/tb_data`` from the reference's values on the golden set.

    Args:
        prj: the hls4ml project folder.
        info: the backend's manifest facts (``device_inputs`` / ``device_outputs``: IR value names
            in the order of the top function's arguments).
        values: ``{IR value: (n, *shape) codes}`` of every value (the reference interpreter with
            ``keep=True``, codes for fixed types).
    Returns:
        ``{"samples": n, "float32_exact": bool, "files": [...]}``; ``float32_exact`` False when a
        device input or output has a value that a float32 cannot hold (a type wider than 24
        significant bits): the testbench's ``atof``/``float`` then rounds it.
    """
    ins = [d["value"] for d in info["device_inputs"]]
    outs = [d["value"] for d in info["device_outputs"]]
    xs = [_real(graph, v, values[v]) for v in ins]
    ys = [_real(graph, v, values[v]) for v in outs]
    n = xs[0].shape[0] if xs else 0
    exact = all(np.array_equal(a.astype(np.float32).astype(np.float64), a) for a in xs + ys)
    tb = prj / "tb_data"
    tb.mkdir(exist_ok=True)
    with open(prj / TB_INPUT, "w") as f:
        f.writelines(_line(x[i] for x in xs) for i in range(n))
    with open(prj / TB_OUTPUT, "w") as f:
        f.writelines(_line(y[i] for y in ys) for i in range(n))
    return {"samples": int(n), "float32_exact": bool(exact), "files": [TB_INPUT, TB_OUTPUT]}


def exact_results_log(prj: Path, project: str) -> bool:
    """Make ``prj/<project>_test.cpp`` print its results with 17 significant digits
    (``fout.precision(17)`` after the results file is opened): hls4ml's testbench prints them with
    the stream's default 6, so ``csim_results.log`` rounded every value of more than 6 digits
    (``0.513671875`` as ``0.513672``) and could not be compared with the expected outputs.  Returns
    False when the template's line was not found (the file is left as it was)."""
    tb = prj / f"{project}_test.cpp"
    if not tb.is_file():
        return False
    text = tb.read_text()
    anchor = "std::ofstream fout(RESULTS_LOG);"
    if anchor not in text or "fout.precision(17);" in text:
        return "fout.precision(17);" in text
    tb.write_text(text.replace(anchor, anchor + "\n    fout.precision(17); // qdeploy: exact decimal results", 1))
    return True


def point_output_dir(prj: Path, final_prj: Path) -> None:
    """Set ``OutputDir`` in ``prj/hls4ml_config.yml`` (written while the artifact was being staged)
    to ``final_prj``, the folder the project has once the compile publishes it."""
    cfg = prj / "hls4ml_config.yml"
    if cfg.is_file():
        text = cfg.read_text()
        cfg.write_text(re.sub(r"(?m)^OutputDir:.*$", f"OutputDir: {final_prj}", text))


def write_readme(prj: Path, info: dict, tb: dict, golden: str) -> None:
    """``prj/README.md``: how to run C simulation / synthesis / co-simulation, the ports, where the
    testbench data came from and what runs on the host."""
    name = info.get("project_name", "myproject")
    rows = []
    for kind, key in (("in", "device_inputs"), ("out", "device_outputs")):
        for d in info.get(key, []):
            rows.append(f"| {kind} | `{d.get('port', d['layer'])}` | `{d['layer']}` | `{d['value']}` | `{d['type']}` | "
                        f"{d['shape']} | " + ("stream of pixels, channels innermost (`hls::stream`)"
                                              if info.get("io_type") == "io_stream" else
                                              "array, channels-last (C order of the shape)") + " |")
    host = info.get("host_nodes") or {}
    lines = [
        f"# {name}: hls4ml {info.get('hls4ml_version', '')} project written by qdeploy",
        "",
        f"Backend {info.get('backend')}, " + ("ASIC (tech asic)" if info.get("backend") == "Catapult" else
                                              f"part `{info.get('part')}`") + f", clock period {info.get('clock_period')} ns, "
        f"`{info.get('io_type')}`, strategy {info.get('strategy')}, reuse factor {info.get('reuse_factor')}.",
        "",
        "## Run it",
        "",
        "```",
        *({"Catapult": ["catapult -product ultra -shell -f build_prj.tcl -eval 'set ::argv \"csim=1 synth=1\"'"
                        "   # Siemens Catapult HLS (hls4ml CatapultBackend.build)"],
           "Vivado": ['vivado_hls -f build_prj.tcl "csim=1 synth=0 cosim=0"    # C simulation on tb_data/',
                      'vivado_hls -f build_prj.tcl "csim=1 synth=1 cosim=1"    # + synthesis and RTL co-simulation']}
          .get(info.get("backend"), ['vitis_hls -f build_prj.tcl "csim=1 synth=0 cosim=0"     # C simulation on tb_data/',
                                     'vitis_hls -f build_prj.tcl "csim=1 synth=1 cosim=1"     # + synthesis and RTL co-simulation'])),
        "```",
        "",
        "Without the vendor tool: "
        + (f"`g++ -O1 -std=c++17 -Ifirmware -Ifirmware/ac_types/include -Ifirmware/ac_math/include "
           f"-Ifirmware/ac_simutils/include -Ifirmware/nnet_utils {name}_test.cpp firmware/{name}.cpp -o tb && "
           f"./tb firmware/weights {TB_INPUT} {TB_OUTPUT}`" if info.get("backend") == "Catapult" else
           f"`g++ -O1 -std=c++17 -Ifirmware -Ifirmware/ap_types '-DWEIGHTS_DIR=\"firmware/weights\"' "
           f"{name}_test.cpp firmware/{name}.cpp -o tb && ./tb`")
        + " (from this folder; the C simulation reads the "
        "weights from `firmware/weights/*.txt`) writes `tb_data/csim_results.log`, one line "
        "per output per sample; it equals `tb_data/tb_output_predictions.dat` value for value"
        + (" (qdeploy set the results file to 17 significant digits: hls4ml's default 6 rounds them)."
           if tb.get("exact_log") else "."),
        "",
        "## Ports (top function arguments, in order)",
        "",
        "| dir | argument | hls4ml layer | qdeploy IR value | type | shape | layout |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Testbench data",
        "",
        f"`{TB_INPUT}` / `{TB_OUTPUT}`: {tb['samples']} samples, {golden}; the values at the device ports "
        "(after the host-side input quantizers, before any host-side output step), from qdeploy's "
        "reference interpreter, which the compile checked against this firmware's C simulation."
        + ("" if tb["float32_exact"] else " **Some values need more than float32's 24 significant bits: the "
                                         "testbench reads them through `atof`/`float` and rounds them.**"),
        "",
        "## What runs outside the firmware",
        "",
        f"Host prologue (qdeploy runs it before the firmware): {', '.join(host.get('prologue', [])) or 'nothing'}. "
        f"Host epilogue: {', '.join(host.get('epilogue', [])) or 'nothing'}.",
        "",
        f"`hls4ml_config.yml` names this folder as `OutputDir`; if you move the folder, update it there.",
        "",
        f"`{'qdeploy_weights_dir.h'}` / `{'qdeploy_weights_dir.cpp'}`: only for qdeploy's own C-simulation library "
        "(it reads the weight `.txt` files from wherever the artifact lies); the HLS tool does not use them.",
        "",
    ]
    (prj / "README.md").write_text("\n".join(lines))
