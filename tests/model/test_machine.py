"""Thread choice: from the cores actually free, or as asked, applied to torch and reported by the CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.cli import app
from lmatlas.errors import InputError
from lmatlas.machine import (
    LARGE_FORWARD_TOKENS,
    calibrate,
    choose_threads,
    pick_calibrated,
    usable_cores,
    use_threads,
    workload_for,
)


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
        assert 1 <= choice.threads <= cores and choice.load == load and choice.workload == "batch"
        assert choice.threads == max(1, min(cores, math.floor(cores - load + 0.5 + 1e-9)))
        assert choice.threads == (cores if load < 0.5 else choice.threads) and (load < cores + 1 or choice.threads == 1)
    assert choose_threads(3).threads == 3 and choose_threads(3).reason == "as asked"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="whole number"):
            choose_threads(bad)
    with pytest.raises(InputError, match="decode, batch, workers"):
        choose_threads(workload="training")


# (cores, load) -> threads for decode (a core counts when >= 75% free) and batch (>= 50% free), by hand.
TABLE = [
    ((2, 0.0), 2, 2),
    ((2, 0.2), 2, 2),
    ((2, 0.3), 1, 2),
    ((2, 0.5), 1, 2),
    ((2, 0.6), 1, 1),
    ((2, 1.0), 1, 1),  # a sibling process on one core: one thread for every workload
    ((2, 5.0), 1, 1),
    ((8, 0.0), 8, 8),
    ((8, 2.4), 5, 6),  # 5.6 cores free: 5 at least 75% free, 6 at least half
    ((8, 2.6), 5, 5),
    ((1, 0.0), 1, 1),
]


@pytest.mark.parametrize(("machine", "decode", "batch"), TABLE)
def test_choice_per_workload_from_a_fake_reading(machine, decode, batch):
    cores, load = machine
    assert choose_threads(workload="decode", cores=cores, load=load).threads == decode
    assert choose_threads(workload="batch", cores=cores, load=load).threads == batch
    said = choose_threads(workload="decode", cores=cores, load=load).describe()
    assert f"{decode} of {cores} CPU threads" in said and "decode work" in said and f"load {load:.2f}" in said


def test_workload_of_a_forward_size():
    assert workload_for(1).name == workload_for(9).name == "decode"
    assert workload_for(LARGE_FORWARD_TOKENS).name == workload_for(8192).name == "batch"


def test_calibration_keeps_the_fewest_threads_within_tolerance(restore_threads):
    assert pick_calibrated({1: 1.0, 2: 0.55}) == 2
    assert pick_calibrated({1: 1.0, 2: 0.97}) == 1  # within 5%: the second thread does not pay
    assert pick_calibrated({1: 1.0, 2: 1.8, 4: 0.99}) == 1
    # A fake step whose duration depends on the thread count set when it runs, read by a fake clock.
    cost = {1: 10.0, 2: 6.0, 3: 7.0}
    now = [0.0]
    calls = []

    def step():
        calls.append(torch.get_num_threads())
        now[0] += cost[torch.get_num_threads()]

    result = calibrate(step, [1, 2, 3], rounds=3, clock=lambda: now[0])
    assert result.threads == 2 and torch.get_num_threads() == 2
    assert result.medians == {1: 10.0, 2: 6.0, 3: 7.0}
    assert sorted(calls) == sorted([1, 2, 3] * 4)  # one warm-up and three timed runs each
    assert calls[3:6] == [1, 2, 3] and calls[6:9] == [2, 3, 1]  # rounds alternate the order


def test_use_threads_sets_torch(restore_threads):
    assert use_threads(1).threads == 1 and torch.get_num_threads() == 1


def test_cli_threads_option_is_applied_and_reported(restore_threads, tmp_path):
    from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["--threads", "1", "generate", str(tmp_path), "hello", "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert "Ran on 1 of" in result.stderr and "as asked" in result.stderr and "decode work" in result.stderr
    assert json.loads(result.stdout)["max_new_tokens"] == 2 and torch.get_num_threads() == 1
    bad = CliRunner().invoke(app, ["--threads", "0", "info"])
    assert bad.exit_code == 2 and "whole number" in bad.output and "Traceback" not in bad.output


def test_cli_generate_chooses_for_decode_work(restore_threads, tmp_path, monkeypatch):
    from lmatlas import machine
    from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.4, 0.4))  # batch work would take 2 threads here
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "hello", "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert "Ran on 1 of 2 CPU threads" in result.stderr and "decode work" in result.stderr
    assert torch.get_num_threads() == 1


# (cores, load) -> worker processes for an atlas build: a core counts while it is not fully busy.
WORKER_TABLE = [((2, 0.0), 2), ((2, 0.6), 2), ((2, 1.0), 2), ((2, 1.1), 1), ((2, 3.0), 1), ((8, 2.6), 6), ((1, 0.0), 1)]


@pytest.mark.parametrize(("machine", "workers"), WORKER_TABLE)
def test_worker_processes_count_every_core_not_fully_busy(machine, workers):
    cores, load = machine
    choice = choose_threads(workload="workers", cores=cores, load=load)
    assert choice.threads == workers == max(1, min(cores, math.floor(cores - load + 1 + 1e-9)))
    assert "workers work" in choice.describe()


def test_cli_map_chooses_workers_and_local_chooses_batch(restore_threads, model_dir, tmp_path, monkeypatch):
    from lmatlas import machine

    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # one core busy: batch work takes 1 thread
    for executor, threads in (("auto", 2), ("local", 1)):
        out = tmp_path / f"{executor}.atlas.duckdb"
        args = ["map", model_dir, "--out", str(out), "--only", "structure", "--executor", executor]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == threads, executor
