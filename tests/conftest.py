"""Shared fixtures: tiny random models of every family, and the real packaged models.

Real models are session-scoped (loading a GGUF takes 15-45 s on 2 cores) and their
tests are marked ``slow``; they still run in CI.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from lmatlas.model.tiny import TINY_CONFIGS, tiny_model  # noqa: E402

TINY_TYPES = sorted(TINY_CONFIGS)
_TINY: dict[str, object] = {}


def get_tiny(model_type: str):
    """A cached tiny model (tests must not leave edits behind: hooks are scoped by `with`)."""
    if model_type not in _TINY:
        _TINY[model_type] = tiny_model(model_type)
    return _TINY[model_type]


@pytest.fixture(params=TINY_TYPES)
def tiny(request):
    return get_tiny(request.param)


@pytest.fixture
def llama():
    return get_tiny("llama")


@pytest.fixture(scope="session")
def smollm2():
    import lmatlas

    return lmatlas.load()


@pytest.fixture(scope="session")
def gemma3():
    import lmatlas

    return lmatlas.load("gemma3-270m")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The explorer tests' tiny model: its two atlases (``a``, ``b``) and its directory (``model``), once per module."""
    from test_web_atlas import web_atlases

    return web_atlases(tmp_path_factory)


@pytest.fixture(scope="module")
def model(paths):
    """The explorer tests' tiny model, loaded from its directory (a module may define its own ``model``)."""
    from lmatlas.model.loading import load

    return load(paths["model"])
