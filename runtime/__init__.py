"""Runtime: load and run compiled artifacts (`CompiledModel`)."""
from .compiled import ArtifactError, CompiledModel

__all__ = ["ArtifactError", "CompiledModel"]
