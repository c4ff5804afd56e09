"""Runtime: load and run compiled artifacts (`CompiledModel`)."""
from .compiled import ArtifactError, CompiledModel

__all__ = ["ArtifactError", "CompiledModel"]

# --- issue 6: early exits (multi-stage host control plan) ---
from .multistage import MultiStageModel, PlanError, StageHost  # noqa: E402

__all__ += ["MultiStageModel", "PlanError", "StageHost"]
# --- end issue 6 ---
