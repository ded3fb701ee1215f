"""The model layer: load a causal LM, map its parts (ArchSpec) and hook them (sites)."""

from lmatlas.model.arch import ArchSpec, HeadLayout
from lmatlas.model.cache import ActivationCache
from lmatlas.model.check import FidelityReport, check
from lmatlas.model.families import ARCH_SPECS, supported_model_types
from lmatlas.model.from_layer import run_from
from lmatlas.model.handle import Model
from lmatlas.model.loading import load
from lmatlas.model.sites import COMPONENTS, Site

__all__ = [
    "ARCH_SPECS",
    "COMPONENTS",
    "ActivationCache",
    "ArchSpec",
    "FidelityReport",
    "HeadLayout",
    "Model",
    "Site",
    "check",
    "load",
    "run_from",
    "supported_model_types",
]
