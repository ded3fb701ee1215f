"""lmatlas: map, decode and edit every head, neuron and layer of a causal LM.

>>> import lmatlas
>>> model = lmatlas.load()                      # the packaged SmolLM2-135M-Instruct  # doctest: +SKIP
>>> lmatlas.check(model).passed                 # hooks are exact, writes sum up      # doctest: +SKIP
True
"""

from lmatlas.errors import (
    FidelityError, LmatlasError, ModelFileError, NotACausalLMError, SiteError, UnsupportedArchitectureError,
)
from lmatlas.model import ActivationCache, FidelityReport, Model, Site, check, load, supported_model_types

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "FidelityError", "FidelityReport", "LmatlasError", "Model", "ModelFileError",
    "NotACausalLMError", "Site", "SiteError", "UnsupportedArchitectureError", "__version__", "check", "load",
    "supported_model_types",
]
