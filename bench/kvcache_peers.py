"""Benchmark: kvpress's presses on the same prompts and budgets as ``bench/kvcache.py``, in the same JSON format.

kvpress 0.5.5 needs transformers < 5.3, so it runs in a virtual environment of its own,
``.venv-kvpress`` (git-ignored), which this script creates when it is missing: a venv whose
``_lmatlas_base.pth`` appends this project's site-packages (torch and the other shared
packages are reused, not downloaded again; the venv's own transformers 5.2 comes first on
the path), then ``pip install kvpress==0.5.5 "transformers<5.3"`` from PyPI.

Then it exports the prompts (``bench/kv_tasks.py``, the seeds of ``bench/kvcache.py``: the
same prompts), runs ``bench/kvcache_peers_runner.py`` inside that venv on the model's Hugging
Face directory (lmatlas's converted GGUF cache, or a saved copy), and summarises the records
with ``bench/kv_metrics.py``. Presses (``NAME@B``: at the bytes an lmatlas plan with budget
``B`` holds at that length, ``B + (1 - B) * (sink + recent) / length`` of the full cache):

=============  ==========================================================================
snapkv@B       kvpress ``SnapKVPress`` (window 32, kernel 5), gathers the kept entries
expected@B     ``ExpectedAttentionPress``
streaming@B    ``StreamingLLMPress`` (``n_sink = sink``)
kvzip@B        ``KVzipPress`` (context reconstruction: several extra forwards)
duo@B          ``DuoAttentionPress`` fed lmatlas's ranking (``--ranking``, from ``--scores``):
               the lowest ``1 - B`` of KV heads stream (sink + recent); it masks with fake
               keys and holds every entry, which its bytes show
=============  ==========================================================================

    python bench/kvcache_peers.py --scores bench/results/kvcache_head_scores_smollm2.json \\
        --out bench/results/kvcache_peers_smollm2.json --trials 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import ROOT, Log, conditions, load_model, write_record  # noqa: E402
from kv_metrics import summarise  # noqa: E402
from kv_tasks import TASKS, make_trial  # noqa: E402

from lmatlas.infer.needle import Haystack

VENV = ROOT / ".venv-kvpress"
PRESSES = "snapkv@0.25,expected@0.25,streaming@0.25,kvzip@0.25,duo@0.25"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--presses", default=PRESSES)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--hops", type=int, default=2)
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--scores", default=None, help="rankings JSON of bench/kvcache.py (for duo@B)")
    p.add_argument("--ranking", default="grad", help="which ranking feeds kvpress's DuoAttention")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def venv_python() -> Path:
    """``.venv-kvpress/bin/python``, creating the venv (and installing kvpress) when it is missing."""
    python = VENV / "bin" / "python"
    ok = python.exists() and subprocess.run([python, "-c", "import kvpress"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        base = [p for p in sys.path if p.endswith("site-packages")][0]
        (Path(purelib) / "_lmatlas_base.pth").write_text(base + "\n")
        subprocess.run([python, "-m", "pip", "install", "-q", "kvpress==0.5.5", "transformers<5.3"], check=True)
    return python


def model_dir(model) -> Path:
    """A Hugging Face directory of ``model`` (lmatlas's GGUF conversion cache, or a copy saved under tmp/)."""
    from lmatlas.model import gguf_cache

    gguf = (model.provenance.file or "").endswith(".gguf")
    hit = gguf_cache.cached(model.provenance.sha256) if gguf and gguf_cache.enabled() else None
    if hit is not None:
        return Path(hit)
    out = ROOT / "tmp" / "kvpress-model" / model.provenance.source.replace("/", "_").replace(":", "_")
    if not (out / "config.json").exists():
        model.hf.save_pretrained(out)
        model.tokenizer.save_pretrained(out)
    return out


def press_ratio(budget: float, length: int, sink: int, recent: int) -> float:
    """The compression ratio leaving what a plan with ``budget`` full KV heads holds at ``length`` tokens."""
    held = budget + (1 - budget) * min(1.0, (sink + recent) / length)
    return round(1 - held, 4)


def export(model, args, path: Path) -> None:
    """One JSON line per prompt: its ids and the presses to run with their ratios."""
    haystack = Haystack(model.tokenizer)
    rankings = json.loads(Path(args.scores).read_text())["rankings"] if args.scores else {}
    scores = rankings.get(args.ranking, {}).get("kv_scores")
    with path.open("w") as out:
        for length in args.lengths:
            for task in args.tasks:
                for index in range(args.trials):
                    trial = make_trial(haystack, task, length, index, args.trials, args.seed, vars(args))
                    methods = [{"method": "full", "press": "full", "ratio": 0.0}]
                    for spec in args.presses.split(","):
                        name, _, budget = spec.partition("@")
                        ratio = (
                            1 - float(budget)
                            if name == "duo"
                            else press_ratio(float(budget), length, args.sink, args.recent)
                        )
                        if name == "duo" and scores is None:
                            raise SystemExit(f"duo needs the {args.ranking!r} ranking in --scores")
                        methods.append({"method": f"kvpress-{spec}", "press": name, "ratio": ratio})
                    item = {"task": task, "length": length, "index": index, "methods": methods}
                    item.update(prompt_ids=list(trial.prompt_ids), answer_ids=list(trial.answer_ids))
                    item.update(head_scores=scores, sink=args.sink, recent=args.recent)
                    out.write(json.dumps(item) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    log = Log("kvcache_peers")
    python = venv_python()
    before = conditions()
    model = load_model(args.model)
    directory = model_dir(model)
    out = Path(args.out)
    prompts, records = out.with_suffix(".prompts.jsonl"), out.with_suffix(".jsonl")
    export(model, args, prompts)
    log(f"prompts in {prompts}; running kvpress in {VENV.name} on {directory}")
    runner = Path(__file__).with_name("kvcache_peers_runner.py")
    command = [python, runner, "--model-dir", directory, "--prompts", prompts, "--records", records]
    subprocess.run([str(c) for c in command] + ["--threads", str(args.threads)], check=True)
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    version = subprocess.run(
        [
            python,
            "-c",
            "import kvpress, transformers, importlib.metadata as m; print(m.version('kvpress'), transformers.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    record = {
        "benchmark": "kvcache-peers",
        "model": model.provenance.source,
        "kvpress": version[0] if version else None,
        "kvpress_transformers": version[1] if len(version) > 1 else None,
        "tasks": args.tasks,
        "lengths": args.lengths,
        "trials": args.trials,
        "presses": args.presses.split(","),
        "ranking_fed_to_duo": args.ranking,
        "sink": args.sink,
        "recent": args.recent,
        "records": str(records),
        "summary": summarise(rows),
    }
    write_record(out, record, before)
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
