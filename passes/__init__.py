"""Graph -> Graph passes and the PassManager.

``default_pipeline`` is what ``qdeploy compile`` runs: dead-code elimination, batch-norm and
constant folding, input quantization, exact float-affine conversion, precision inference.
"""
from __future__ import annotations

from functools import partial

from .fold import dce, fold_affine_chains, fold_batchnorm
from .manager import PassManager, PassRecord
from .partition import Partition, partition, run_partitioned
from .precision import affine_to_fixed, infer_precision, input_type_for, quantize_inputs


def default_pipeline(input_type=None, calibration=None) -> list:
    """The standard pass list (each a ``Graph -> Graph`` callable with a ``__name__``)."""
    qi = partial(quantize_inputs, input_type=input_type, calibration=calibration)
    qi.__name__ = "quantize_inputs"
    return [dce, fold_batchnorm, fold_affine_chains, qi, affine_to_fixed, infer_precision, dce]


__all__ = ["PassManager", "PassRecord", "Partition", "partition", "run_partitioned", "dce", "fold_affine_chains",
           "fold_batchnorm", "affine_to_fixed", "infer_precision", "input_type_for", "quantize_inputs",
           "default_pipeline"]

# --- issue 6: early-exit splitting ---
from .early_exit import EarlyExitError, StagedProgram, split_exits  # noqa: E402

__all__ += ["EarlyExitError", "StagedProgram", "split_exits"]
# --- end issue 6 ---

# --- issue 8: rematerialization under a memory budget ---
from .memory import memory_profile, min_feasible_bytes, peak_memory, value_bytes  # noqa: E402
from .remat import RematError, remat_pass, rematerialize  # noqa: E402

__all__ += ["memory_profile", "min_feasible_bytes", "peak_memory", "value_bytes", "RematError", "remat_pass",
            "rematerialize"]
# --- end issue 8 ---
