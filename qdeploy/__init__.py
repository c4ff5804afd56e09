"""qdeploy: a hardware-deployment compiler for quantized neural networks.

``qdeploy.compile(model, target, out_dir)`` imports a QONNX/ONNX file or a Brevitas model,
optimizes the IR, emits hls4ml firmware or a TVM library, checks it bit for bit against the
reference interpreter and writes a report.  ``qdeploy.run(out_dir, x)`` runs any artifact.
``qdeploy.estimate(model, target=...)`` gives FPGA/ASIC estimates without vendor tools, and
``qdeploy.search(recipe, out_dir, budgets)`` runs the Hessian-guided mixed-precision search.
"""
import warnings as _warnings

# Brevitas warns on import that an optional CUDA kernel package (fast_hadamard_transform, used only by
# its Hadamard-rotation equalization, which qdeploy never calls) is missing: on every compile of a
# module:function model and in every search worker.  Only that message is silenced.
_warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found", category=UserWarning)

from .api import CompileResult, compile, estimate, load, load_config, run, search
from .runtime import CompiledModel
from .version import __version__

__all__ = ["compile", "load", "load_config", "run", "estimate", "search", "CompileResult", "CompiledModel",
           "__version__"]
