"""The host of compiled dynamic networks: :class:`DynamicModel` (interpreter, ``model``), the
saved control plan (``plan``), host values (``values``) and the batch-1 code generator
(``codegen``)."""
from .model import DynamicModel
from .plan import ControlPlan, HostBlock, stage_name
from .values import DevVal, HostVal

__all__ = ["DynamicModel", "DevVal", "HostVal", "ControlPlan", "HostBlock", "stage_name"]
