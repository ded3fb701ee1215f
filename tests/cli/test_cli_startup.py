"""The command line starts quickly, stays quiet, and reports errors in one shape.

* ``lmatlas --help`` (and every command's help) imports no torch / transformers /
  duckdb: measured in a fresh interpreter by what is in ``sys.modules``, not by a clock;
* ordinary commands print no third-party progress bars; ``--verbose`` shows them;
* errors under ``--json`` are a JSON object on stdout, exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from lmatlas.cli import app

HEAVY = ("torch", "transformers", "duckdb", "pyarrow")
COMMANDS = ("map", "show", "export", "diff", "search", "lens", "neurons", "heads", "info", "check", "sites")


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env or os.environ.copy()
    )


def test_import_lmatlas_and_the_cli_help_load_no_heavy_module():
    code = (
        "import sys, lmatlas\n"
        "from typer.testing import CliRunner\n"
        "from lmatlas.cli import app\n"
        f"for command in [[]] + [[c] for c in {COMMANDS!r}]:\n"
        "    result = CliRunner().invoke(app, command + ['--help'])\n"
        "    assert result.exit_code == 0 and 'Usage' in result.output, (command, result.output)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_names_still_resolve():
    result = _python(
        "import sys, lmatlas; assert 'torch' not in sys.modules; "
        "print(lmatlas.load.__module__, lmatlas.Model.__name__, 'torch' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["lmatlas.model.loading", "Model", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import lmatlas

        lmatlas.nope  # noqa: B018


def test_help_is_fast_enough():
    """A coarse wall-clock guard on top of the module check (the slow start took 3.7 s)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "lmatlas.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    assert time.perf_counter() - started < 3.0


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run(
        [sys.executable, "-m", "lmatlas.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_commands_are_quiet_unless_verbose(model_dir):
    quiet = _cli(["info", model_dir, "--json"])
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["family"] == "llama"
    assert "Loading weights" not in quiet.stderr and "%|" not in quiet.stderr
    loud = _cli(["--verbose", "info", model_dir, "--json"])
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # the third-party bar is only hidden, not gone


@pytest.mark.parametrize(
    "args, kind",
    [
        (["info", "/nowhere/model.gguf"], "ModelFileError"),
        (["map", "--only", "nope"], "LmatlasError"),
        (["map", "--executor", "nope"], "LmatlasError"),
        (["map", "--workers", "0"], "LmatlasError"),
        (["show", "/nowhere/x.duckdb"], "AtlasError"),
    ],
)
def test_errors_under_json_are_a_json_object_on_stdout(args, kind):
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert error["type"] == kind and error["message"] and "\n" not in error["message"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 2 and plain.stdout == ""  # the message goes to stderr
    assert "Traceback" not in plain.output and plain.stderr.startswith("error: ")
    assert len(plain.stderr.strip().splitlines()) == 1
