"""Benchmark: the full head census, time per detector, peak memory, and TransformerLens on the same batteries.

In one process:

1. **Full census**: ``run_census(model)`` with every registered detector and its null
   battery (seed 0). Reports the total wall time (the target for SmolLM2-135M on 2
   CPU cores: under 2 minutes), each detector's time inside the census (a detector's
   time includes the forwards it was first to need: detectors that use the same kind of
   battery share one forward), how many heads each labels, and which detectors were
   skipped because they cannot apply to the model (with the reason).
   Memory: the resident set sampled every 50 ms during the census (its peak, and the
   peak minus the resident set before it), and the process's lifetime peak.
2. **Speed against TransformerLens** (the baseline, measured in the same run): our
   previous-token, duplicate-token and induction detectors *with their null batteries*
   (``run_census(model, [those three])``) against TransformerLens's ``detect_head`` for
   ``previous_token_head``, ``duplicate_token_head`` and ``induction_head`` on the same
   token ids (the ``random`` battery for the first, the ``repeated`` battery for the
   others), ``--repeats`` interleaved rounds, medians. TransformerLens runs on a
   ``TransformerBridge`` booted offline from a copy of our already-loaded Hugging Face
   module (``boot_transformers(name, hf_model=copy, tokenizer=...)``: no hub access);
   ``detect_head`` runs one prompt at a time through ``run_with_cache``. Its model is
   fed our token ids through a small adapter whose ``to_tokens`` returns them, since
   ``detect_head`` tokenizes strings itself. ``ratio_tl_over_ours`` > 1 means ours is faster.
3. **Agreement**: Spearman rank correlations over all heads between our scores from
   the full census and TransformerLens's scores: previous-token, duplicate-token,
   induction (our score includes copying; TransformerLens's is attention only), and our
   induction ``prefix_matching`` subscore (the same measurement as TransformerLens's).

    .venv/bin/python bench/census.py [--model smollm2-135m|gemma3-270m|tiny:<family>|DIR]
        [--repeats 3] [--seed 0] [--detectors previous_token,duplicate_token,induction] [--no-tl]
        [--quick] [--out FILE]

``--quick``: tiny:llama, 1 repeat (seconds). ``--detectors``: the census of step 1 runs only
those (the agreement needs the three compared ones). One JSON object on stdout (and in
``--out``); progress on stderr. The record says how it was taken: the command, the commit,
torch's threads, the ``uptime`` load before and after, the library versions, and every
head's score from both tools (``transformer_lens.scores``), so that a test can recompute the
correlations and compare the census of the current code with the recorded one.

The agreement record, ``bench/results/census_tl.json``, is made with TransformerLens
installed beside the project (it is the ``bench`` extra)::

    .venv/bin/python bench/census.py --detectors previous_token,duplicate_token,induction \
        --out bench/results/census_tl.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from harness import commit, uptime, versions  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas  # noqa: E402
from lmatlas.census import batteries  # noqa: E402
from lmatlas.census.registry import all_detectors  # noqa: E402
from lmatlas.census.run import run_census  # noqa: E402
from lmatlas.model.tiny import tiny_model  # noqa: E402

T0 = time.perf_counter()
OURS = ["previous_token", "duplicate_token", "induction"]
TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}


def log(message: str) -> None:
    print(f"[bench_census {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of the process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident memory, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Samples the current resident memory every ``interval`` seconds in a thread: the peak of one phase."""

    def __init__(self, interval: float = 0.05):
        self.interval, self._stop = interval, threading.Event()
        self.start = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def load(name: str) -> lmatlas.Model:
    return tiny_model(name.removeprefix("tiny:")) if name.startswith("tiny:") else lmatlas.load(name)


def grid(scores: torch.Tensor) -> list[list[float]]:
    """``[layer, head]`` scores as nested lists, 6 decimals."""
    return [[round(float(x), 6) for x in row] for row in scores.float()]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties get their average rank)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten().double()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
        for value in x.unique():
            tied = x == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


class TokenFeed:
    """What ``detect_head`` needs of a model (``cfg``, ``to_tokens``, ``run_with_cache``), fed our token ids.

    ``detect_head(feed, ["0", "1", ...], name)`` runs row ``i`` of ``rows`` for prompt ``"i"``.
    """

    def __init__(self, bridge, rows: torch.Tensor):
        self.bridge, self.rows, self.cfg = bridge, rows, bridge.cfg

    def to_tokens(self, keys: str | list[str]) -> torch.Tensor:
        """``[1, pos]`` for one prompt key, ``[n, pos]`` for a list (``detect_head`` asks for both)."""
        if isinstance(keys, str):
            return self.rows[int(keys)].unsqueeze(0)
        return self.rows[[int(k) for k in keys]]

    def run_with_cache(self, *args, **kwargs):
        return self.bridge.run_with_cache(*args, **kwargs)


def boot_transformer_lens(model: lmatlas.Model):
    """A TransformerBridge over a *copy* of our HF module (TransformerLens switches it to eager attention)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tokenizer = model.tokenizer
    if "name_or_path" not in getattr(tokenizer, "init_kwargs", {}):  # built in memory: TL reloads it from its path
        folder = tempfile.mkdtemp(prefix="lmatlas-bench-tokenizer-")
        tokenizer.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    name = getattr(model.hf.config, "_name_or_path", "") or model.family
    return TransformerBridge.boot_transformers(
        name, hf_model=copy.deepcopy(model.hf), tokenizer=tokenizer, device=str(model.device)
    )


def transformer_lens_scores(bridge, model: lmatlas.Model, seed: int) -> dict[str, torch.Tensor]:
    from transformer_lens.head_detector import detect_head

    random_ids = batteries.random_battery(model, "previous_token", seed).input_ids.cpu()
    repeated_ids = batteries.repeated_battery(model, "induction", seed).input_ids.cpu()
    out = {}
    with torch.no_grad():
        for ours, theirs in TL_NAMES.items():
            rows = random_ids if ours == "previous_token" else repeated_ids
            out[ours] = detect_head(TokenFeed(bridge, rows), [str(i) for i in range(len(rows))], theirs).float()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--detectors",
        default=None,
        help="comma-separated detectors for the census of step 1 (default: every registered one)",
    )
    parser.add_argument("--no-tl", action="store_true", help="skip the TransformerLens comparison")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny:llama, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "tiny:llama", 1

    uptime_before = uptime()
    started = time.perf_counter()
    model = load(args.model)
    log(f"loaded {model!r} in {time.perf_counter() - started:.1f}s; {torch.get_num_threads()} torch threads")
    load_start = os.getloadavg()[0]  # other processes on the machine slow every timing down

    names = sorted(args.detectors.split(",")) if args.detectors else sorted(all_detectors())
    with RssSampler() as sampler:
        started = time.perf_counter()
        census = run_census(
            model, names if args.detectors else None, seed=args.seed, progress=lambda m: log(f"census {m}")
        )
        census_s = time.perf_counter() - started
    rss_before = sampler.start
    log(f"full census of {len(names)} detectors: {census_s:.1f}s")
    report = {
        "benchmark": "census",
        "model": args.model,
        "seed": args.seed,
        "command": " ".join(["python", "bench/census.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit(),
        "versions": versions(("transformer-lens",)),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "uptime_before": uptime_before,
        "layers": model.layout.n_layers,
        "heads": model.layout.n_heads,
        "load_average_1min": {"start": round(load_start, 2), "after_census": round(os.getloadavg()[0], 2)},
        "census": {
            "detectors": names,
            "total_s": round(census_s, 3),
            "under_2_minutes": census_s < 120,
            "seconds_per_detector": {n: round(r.seconds, 3) for n, r in census.results.items()},
            "labelled_heads": {n: len(r.heads()) for n, r in census.results.items()},
            "battery_shapes": {n: "x".join(map(str, r.battery["shape"])) for n, r in census.results.items()},
            "skipped": census.skipped,
            "rss_mb_before_census": round(rss_before, 1),
            "peak_rss_mb_during_census": round(sampler.peak, 1),
            "census_extra_peak_mb": round(sampler.peak - rss_before, 1),
            "peak_rss_mb_process": round(peak_rss_mb(), 1),
        },
    }

    if not args.no_tl:
        try:
            import transformer_lens  # noqa: F401
        except ImportError:
            report["transformer_lens"] = {
                "skipped": "transformer-lens is not installed (pip install transformer-lens==4.3.0)"
            }
        else:
            if not set(OURS) <= set(census.results):
                raise SystemExit(f"the TransformerLens comparison needs the census of {OURS} (--detectors)")
            report["transformer_lens"] = compare(model, census, args)
    report["uptime_after"] = uptime()
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text)


def compare(model: lmatlas.Model, census, args) -> dict:
    import transformer_lens

    started = time.perf_counter()
    bridge = boot_transformer_lens(model)
    boot_s = time.perf_counter() - started
    log(
        f"TransformerLens {transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else ''} "
        f"bridge booted in {boot_s:.1f}s"
    )
    times: dict[str, list[float]] = {"ours_3_with_nulls": [], "transformer_lens_3": []}
    tl_scores = None
    for round_ in range(args.repeats):
        start = time.perf_counter()
        run_census(model, OURS, seed=args.seed)
        times["ours_3_with_nulls"].append(time.perf_counter() - start)
        start = time.perf_counter()
        tl_scores = transformer_lens_scores(bridge, model, args.seed)
        times["transformer_lens_3"].append(time.perf_counter() - start)
        log(
            f"round {round_ + 1}/{args.repeats}: ours {times['ours_3_with_nulls'][-1]:.1f}s, "
            f"TransformerLens {times['transformer_lens_3'][-1]:.1f}s"
        )
    medians = {name: statistics.median(values) for name, values in times.items()}
    induction = census["induction"]
    return {
        "version": "4.3.0" if not hasattr(transformer_lens, "__version__") else transformer_lens.__version__,
        "bridge_boot_s": round(boot_s, 3),
        "repeats": args.repeats,
        "median_s": {name: round(m, 3) for name, m in medians.items()},
        "ratio_tl_over_ours": round(medians["transformer_lens_3"] / medians["ours_3_with_nulls"], 3),
        "ours_faster": medians["ours_3_with_nulls"] < medians["transformer_lens_3"],
        "spearman": {
            "previous_token": round(spearman(census["previous_token"].score, tl_scores["previous_token"]), 4),
            "duplicate_token": round(spearman(census["duplicate_token"].score, tl_scores["duplicate_token"]), 4),
            "induction_score": round(spearman(induction.score, tl_scores["induction"]), 4),
            "induction_prefix_matching": round(
                spearman(induction.subscores["prefix_matching"]["score"], tl_scores["induction"]), 4
            ),
        },
        "peak_rss_mb_after_tl": round(peak_rss_mb(), 1),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        # every head's score, [layer][head]: the correlations above can be recomputed from these
        "scores": {
            "ours": {
                "previous_token": grid(census["previous_token"].score),
                "duplicate_token": grid(census["duplicate_token"].score),
                "induction_score": grid(induction.score),
                "induction_prefix_matching": grid(induction.subscores["prefix_matching"]["score"]),
            },
            "transformer_lens": {name: grid(tl_scores[name]) for name in OURS},
        },
    }


if __name__ == "__main__":
    main()
