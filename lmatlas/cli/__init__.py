"""The ``lmatlas`` command line: the app in :mod:`lmatlas.cli.app`, commands in ``*_commands`` modules.

Every ``lmatlas/cli/<group>_commands.py`` module is imported here, so adding a
command group is adding a module (each registers its commands on ``app``).
"""

from __future__ import annotations

import importlib
import pkgutil

from lmatlas.cli.app import app
from lmatlas.cli.help_text import clean_help
from lmatlas.cli.usage import run_app

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_commands")):
    importlib.import_module(f"{__name__}.{_module}")
clean_help(app)  # --help shows plain text, not the docstrings' reStructuredText


def main() -> int:
    """Console-script entry point: bad input on one line, exit status 2 (:mod:`lmatlas.cli.usage`)."""
    return run_app(app)


__all__ = ["app", "main"]
