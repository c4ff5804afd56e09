"""Graph -> Graph passes, the pass registry and the PassManager.

``default_pipeline`` is what ``qdeploy compile`` runs: dead-code elimination, batch-norm and
constant folding, input quantization, exact float-affine conversion, precision inference,
threshold requantizers to proved multiply-and-shift form (``requant_shift``), and,
when a memory budget is set, rematerialization.  Early-exit splitting and partitioning produce
multi-stage plans, not graphs; they are functions, not registered passes.
"""
from __future__ import annotations

from .early_exit import EarlyExitError, StagedProgram, split_exits
from .fold import dce, fold_affine_chains, fold_batchnorm
from .lookup import fold_lookup_quantize
from .manager import (PASSES, PassContext, PassManager, PassRecord, current_context, describe_pipeline, dump_to,
                      get_pass, normalize_pipeline, note, pass_names, register_pass)
from .memory import memory_profile, min_feasible_bytes, peak_memory, value_bytes
from .partition import Partition, partition, run_partitioned
from .precision import affine_to_fixed, infer_precision, input_type_for, quantize_inputs
from .remat import RematError, remat_pass, rematerialize
from .requant_shift import requant_shift


def default_pipeline(input_type=None, calibration=None, remat_options: dict | None = None) -> list:
    """The standard pipeline as data: a list of pass names and ``(name, options)`` pairs.

    Args:
        input_type: the ``quantize_inputs`` type (text, a FixedType, or None/"auto").
        calibration: input name -> batch-first float array, for ``quantize_inputs``.
        remat_options: when given (a dict with ``budget`` and optional ``packing``,
            ``max_copies``, ``time_limit``, ``method``, ``cost``), ``("remat", remat_options)``
            runs last.
    """
    pipeline = ["dce", "fold_batchnorm", "fold_affine_chains", "fold_lookup_quantize",
                ("quantize_inputs", {"input_type": input_type, "calibration": calibration}),
                "affine_to_fixed", "infer_precision", "requant_shift", "dce"]
    if remat_options is not None:
        pipeline.append(("remat", dict(remat_options)))
    return pipeline


__all__ = ["PASSES", "PassContext", "PassManager", "PassRecord", "current_context", "describe_pipeline", "dump_to",
           "get_pass", "normalize_pipeline", "note", "pass_names", "register_pass", "default_pipeline",
           "Partition", "partition", "run_partitioned", "dce", "fold_affine_chains", "fold_batchnorm",
           "fold_lookup_quantize",
           "affine_to_fixed", "infer_precision", "input_type_for", "quantize_inputs",
           "EarlyExitError", "StagedProgram", "split_exits",
           "memory_profile", "min_feasible_bytes", "peak_memory", "value_bytes", "RematError", "remat_pass",
           "rematerialize", "requant_shift"]
