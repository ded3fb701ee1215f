"""Thread choice: from the cores actually free, or as asked, applied to torch and reported by the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.cli import app
from lmatlas.errors import InputError
from lmatlas.machine import choose_threads, usable_cores, use_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_takes_the_cores_not_busy(monkeypatch):
    cores = usable_cores()
    for load in (0.0, cores + 3.0, cores - 1.0, 0.4):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        choice = choose_threads()
        assert 1 <= choice.threads <= cores and choice.load == load
        assert choice.threads == max(1, min(cores, round(cores - load + 0.5)))
        assert choice.threads == (cores if load < 0.5 else choice.threads) and (load < cores + 1 or choice.threads == 1)
    assert choose_threads(3).threads == 3 and choose_threads(3).reason == "as asked"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="whole number"):
            choose_threads(bad)


def test_use_threads_sets_torch(restore_threads):
    assert use_threads(1).threads == 1 and torch.get_num_threads() == 1


def test_cli_threads_option_is_applied_and_reported(restore_threads, tmp_path):
    from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["--threads", "1", "generate", str(tmp_path), "hello", "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert "Ran on 1 of" in result.stderr and "as asked" in result.stderr
    assert json.loads(result.stdout)["max_new_tokens"] == 2 and torch.get_num_threads() == 1
    bad = CliRunner().invoke(app, ["--threads", "0", "info"])
    assert bad.exit_code == 2 and "whole number" in bad.output and "Traceback" not in bad.output
