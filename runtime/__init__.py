"""Runtime: load and run compiled artifacts (`CompiledModel`) and multi-stage programs
(`MultiStageModel` for early exits; the host of dynamic programs shares `StageHost`)."""
from .artifact import ArtifactError
from .compiled import CompiledModel
from .multistage import MultiStageModel, PlanError, StageHost

__all__ = ["ArtifactError", "CompiledModel", "MultiStageModel", "PlanError", "StageHost"]
