"""qdeploy: a hardware-deployment compiler for quantized neural networks.

``qdeploy.compile(model, target, out_dir)`` imports a QONNX/ONNX file or a Brevitas model,
optimizes the IR, emits hls4ml firmware or a TVM library, checks it bit for bit against the
reference interpreter and writes a report.  ``qdeploy.run(out_dir, x)`` runs any artifact.
``qdeploy.estimate(model, target=...)`` gives FPGA/ASIC estimates without vendor tools, and
``qdeploy.search(recipe, out_dir, budgets)`` runs the Hessian-guided mixed-precision search.
"""
from .api import CompileResult, compile, estimate, load, load_config, run, search
from .runtime import CompiledModel
from .version import __version__

__all__ = ["compile", "load", "load_config", "run", "estimate", "search", "CompileResult", "CompiledModel",
           "__version__"]
