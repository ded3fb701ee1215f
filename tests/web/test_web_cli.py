"""``lmatlas serve``: a real server process on the loopback interface, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from support.web import free_port, web_atlases
from typer.testing import CliRunner

from lmatlas.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", "from lmatlas.cli import main; main()", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _get(url: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_serve_binds_to_loopback_and_answers(tmp_path_factory):
    paths = web_atlases(tmp_path_factory)
    port = free_port()
    proc = _serve(str(paths["a"]), "--port", str(port), "--model", str(paths["model"]), "--diff", str(paths["b"]))
    try:
        info = _get(f"http://127.0.0.1:{port}/api/atlas")
        assert info["model"]["layers"] == 2 and info["available"]["model"] and info["available"]["diff"]
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" and addr.port == port for addr in listening)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/lens", data=b'{"prompt": "abc"}', headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["layers"] == ["L0", "L1"]
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["/no/such.atlas.duckdb"], "No atlas at"),
        (["README.md"], "not an atlas"),
    ],
)
def test_serve_bad_input_exits_2_with_one_line(args, fragment):
    result = CliRunner().invoke(app, ["serve", *[str(ROOT / a) if a == "README.md" else a for a in args]])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0]


def test_serve_refuses_a_diff_of_another_model(tmp_path_factory, tmp_path):
    from lmatlas.atlas import build_atlas
    from lmatlas.model.tiny import tiny_model

    paths = web_atlases(tmp_path_factory)
    other = tmp_path / "gpt2.atlas.duckdb"
    build_atlas(
        tiny_model("gpt2"), other, only=["structure"], params={"corpus_sequences": 1, "seq_len": 16}, progress=False
    )
    result = CliRunner().invoke(app, ["serve", str(paths["a"]), "--diff", str(other)])
    assert result.exit_code == 2 and "different architectures" in result.output
