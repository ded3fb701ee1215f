"""Benchmark: the explorer on the packaged model's atlas — API latency, overview drawing, 2k-token attention.

A real uvicorn server on 127.0.0.1 serves the atlas with the packaged model attached;
everything is measured through it, as a browser would see it:

* ``api``: median wall time (``--repeats`` calls, after one warm-up) of every atlas-only
  API endpoint, fetched over HTTP; ``baseline`` is ``GET /api/live`` (no atlas work: the
  server's own round trip), and each endpoint's ``ratio_vs_baseline`` is its median over
  the baseline's. Target: every median under 300 ms.
* ``overview``: the overview page in headless Chromium (Debian's, via Playwright), from
  navigation start to the page's "drawn" mark (grid, scatter, layers and neurons all in
  the DOM; ``LM.readyAt``), median over ``--page-repeats`` fresh loads. Target: under 1 s.
* ``attention_2k``: a head's attention on a prompt of ``--tokens`` tokens (default 2,048)
  typed into the head page: the server's time, the time until the canvas is fully drawn,
  and — whether the page froze — the longest main-thread task (Long Tasks API) and the
  longest gap between animation frames while it was drawn.

``load_avg`` (1/5/15 min) before and after: the machine is shared, compare runs at similar load.

    .venv/bin/python bench/web.py [--atlas smollm2-135m.atlas.duckdb] [--repeats 20]
        [--screenshots docs/img] [--out bench/results/web.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness import load_average  # noqa: E402  (bench/ is on the path when a benchmark runs)
from test_web_e2e import CHROMIUM, CHROMIUM_ARGS, Server  # noqa: E402

ATLAS_ONLY = [  # (label, path): every GET endpoint that reads only the atlas
    ("atlas", "/api/atlas"),
    ("heads_grid", "/api/heads"),
    ("layers", "/api/layers"),
    ("neurons_of_layer", "/api/neurons?layer={layer}&sort=top_logit&limit=50"),
    ("neurons_of_layer_by_max", "/api/neurons?layer={layer}&sort=max&limit=50"),
    ("head", "/api/heads/{head}"),
    ("head_windows", "/api/heads/{head}/windows"),
    ("neuron", "/api/neurons/{neuron}"),
    ("search", "/api/search?" + urllib.parse.urlencode({"q": " dog", "limit": 50})),
]

FRAME_PROBE = """() => {
  window.benchGaps = []; window.benchLong = [];
  new PerformanceObserver((list) => list.getEntries().forEach((e) => window.benchLong.push(e.duration)))
    .observe({type: "longtask", buffered: false});
  let last = performance.now();
  const tick = (now) => {
    window.benchGaps.push(now - last); last = now; window.benchRaf = requestAnimationFrame(tick);
  };
  window.benchRaf = requestAnimationFrame(tick);
}"""


def timed_get(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
        assert response.status == 200, url
    return time.perf_counter() - start


def bench_api(base: str, repeats: int, names: dict[str, str]) -> dict:
    out = {}
    for label, path in [("baseline", "/api/live")] + ATLAS_ONLY:
        path = path.format(**names)
        timed_get(base + path)  # warm-up
        runs = [timed_get(base + path) for _ in range(repeats)]
        out[label] = {
            "path": path,
            "median_ms": round(1000 * statistics.median(runs), 2),
            "max_ms": round(1000 * max(runs), 2),
        }
    baseline = out["baseline"]["median_ms"]
    for entry in out.values():
        entry["ratio_vs_baseline"] = round(entry["median_ms"] / baseline, 2)
    return out


def prompt_of(model, tokens: int) -> tuple[str, int]:
    """Natural text (the default corpus) cut so that it tokenizes to at most ``tokens`` tokens."""
    from lmatlas.corpus import default_texts

    ids = model.tokenizer("\n\n".join(default_texts()), add_special_tokens=False)["input_ids"]
    n = tokens
    while True:
        text = model.tokenizer.decode(ids[:n])
        count = model.tokenize(text)["input_ids"].shape[1]
        if count <= tokens:
            return text, count
        n -= count - tokens


def bench_pages(base: str, model, page_repeats: int, tokens: int, head: str, shots: Path | None) -> dict:
    from playwright.sync_api import sync_playwright

    result = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        drawn = []
        for i in range(page_repeats + 1):
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            if i:  # the first load warms the server and the browser's cache
                drawn.append(page.evaluate("LM.readyAt"))
        cells = page.locator("#grid .cell").count()
        if shots:
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "overview.png"), full_page=True)
        result["overview"] = {
            "drawn_ms_median": round(statistics.median(drawn), 1),
            "runs_ms": [round(x, 1) for x in drawn],
            "grid_cells": cells,
        }

        text, count = prompt_of(model, tokens)
        page.goto(base + f"/head/{head}")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.fill("#prompt", text)
        page.evaluate(FRAME_PROBE)
        start = time.perf_counter()
        with page.expect_response(lambda r: r.url.endswith("/attention")) as response_info:
            page.click("#run")
        response = response_info.value
        server_s = time.perf_counter() - start
        response_done = page.evaluate("performance.now()")
        page.wait_for_selector("#attention-canvas[data-drawn='1']", timeout=120_000)
        drawn_at = page.evaluate("performance.now()")
        total_s = time.perf_counter() - start
        page.evaluate("cancelAnimationFrame(window.benchRaf)")
        gaps = page.evaluate("window.benchGaps")
        long_tasks = page.evaluate("window.benchLong")
        canvas_tokens = int(page.locator("#attention-canvas").get_attribute("data-tokens"))
        if shots:
            page.screenshot(path=str(shots / "head.png"), full_page=False)
        result["attention_2k"] = {
            "head": head,
            "prompt_tokens": count,
            "canvas_tokens": canvas_tokens,
            "response_bytes": len(response.body()),
            "request_s": round(server_s, 3),
            "request_to_drawn_s": round(total_s, 3),
            "draw_after_response_ms": round(drawn_at - response_done, 1),
            "longest_task_ms": round(max(long_tasks), 1) if long_tasks else 0.0,
            "long_tasks_over_50ms": len(long_tasks),
            "longest_frame_gap_ms": round(max(gaps), 1) if gaps else None,
            "frames": len(gaps),
        }
        result["console_errors"] = errors
        browser.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--atlas", default="smollm2-135m.atlas.duckdb")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--page-repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--head", default="L5.H3")
    parser.add_argument("--neuron", default="L12.N1031")
    parser.add_argument("--model", default=None, help="the atlas's model (default: the packaged SmolLM2)")
    parser.add_argument("--screenshots", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import lmatlas
    from lmatlas.atlas import Atlas
    from lmatlas.web import create_app

    before = load_average()
    model = lmatlas.load(args.model)
    with Atlas.open(args.atlas) as atlas:
        stages = {r["stage"]: r["units"] for r in atlas.stages().to_pylist()}
    server = Server(create_app(args.atlas, model=model))
    try:
        report = {
            "benchmark": "web",
            "atlas": str(args.atlas),
            "atlas_mb": round(Path(args.atlas).stat().st_size / 2**20, 1),
            "atlas_stages": stages,
            "model": model.provenance.source,
            "load_avg_before": before,
        }
        names = {"head": args.head, "neuron": args.neuron, "layer": args.neuron[1:].split(".")[0]}
        report["api"] = bench_api(server.url, args.repeats, names)
        report.update(bench_pages(server.url, model, args.page_repeats, args.tokens, args.head, args.screenshots))
    finally:
        server.stop()
    report["targets"] = {
        "api_max_median_ms": max(v["median_ms"] for k, v in report["api"].items() if k != "baseline"),
        "api_under_300ms": all(v["median_ms"] < 300 for v in report["api"].values()),
        "overview_under_1s": report["overview"]["drawn_ms_median"] < 1000,
    }
    report["load_avg_after"] = load_average()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
