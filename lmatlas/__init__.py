"""lmatlas: map, decode and edit every head, neuron and layer of a causal LM.

>>> import lmatlas
>>> model = lmatlas.load()                      # the packaged SmolLM2-135M-Instruct  # doctest: +SKIP
>>> lmatlas.check(model).passed                 # hooks are exact, writes sum up      # doctest: +SKIP
True

``import lmatlas`` is light: torch and transformers load on first use of a name
that needs them (``lmatlas.load``, ``lmatlas.Model``, ...), through the module
``__getattr__`` below, so the command line starts quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.errors import (
    FidelityError,
    LmatlasError,
    ModelFileError,
    NotACausalLMError,
    SiteError,
    UnsupportedArchitectureError,
)
from lmatlas.lazy import lazy_exports

__version__ = "0.1.0"

#: Public names that live in heavier modules: name -> module, imported on first access.
_LAZY: dict[str, str] = {
    "ActivationCache": "lmatlas.model.cache",
    "FidelityReport": "lmatlas.model.check",
    "Model": "lmatlas.model.handle",
    "generate": "lmatlas.infer.compose",
    "use_threads": "lmatlas.machine",
    "Site": "lmatlas.model.sites",
    "check": "lmatlas.model.check",
    "load": "lmatlas.model.loading",
    "supported_model_types": "lmatlas.model.families",
}

if TYPE_CHECKING:
    from lmatlas.infer.compose import generate
    from lmatlas.machine import use_threads
    from lmatlas.model import ActivationCache, FidelityReport, Model, Site, check, load, supported_model_types


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ActivationCache",
    "FidelityError",
    "FidelityReport",
    "LmatlasError",
    "Model",
    "ModelFileError",
    "NotACausalLMError",
    "Site",
    "SiteError",
    "UnsupportedArchitectureError",
    "__version__",
    "check",
    "generate",
    "load",
    "use_threads",
    "supported_model_types",
]
