"""Benchmark: decoding with the map (DoLa, DeCoRe, speculative decoding) on the packaged SmolLM2-135M.

Sections (``--only truthfulqa,faithfulness,speculative``; each is written to the JSON as
soon as it is done, so a partial run keeps what it measured):

truthfulqa    TruthfulQA MC1 / MC2 by answer log-likelihood (prompt ``Q: <question>\\nA:``,
              answer `` <answer>``), greedy (the model's log-probabilities) vs DoLa (each answer
              token scored by ``log_softmax(log q_N - log q_M)`` with ``M`` chosen per token by
              the largest Jensen-Shannon divergence among the ``high`` bucket; no plausibility
              cut, as for multiple choice in the paper's code), and the cheaper variants (top-k
              tokens, half the layers). MC1: the best answer scores above every incorrect one;
              MC2: probability mass of the correct answers. Paired-bootstrap 95% intervals of
              DoLa - greedy and of each variant - DoLa. ``--questions N`` takes the first N
              (0 = all 817). A question costs two forwards (the prompt once, its answers in one
              padded batch) and one full-vocabulary readout per distinct answer prefix.
truthfulqa_check  The batched scorer against one uncached forward per answer on the first
              ``--check-questions``: largest score difference per method, MC1 agreement, time.
dola_cost     Time per token of greedy, DoLa and its variants on ``--cost-prompts`` chat prompts
              x ``--cost-tokens`` tokens, ``--cost-repeats`` rounds, the order rotating per round.
faithfulness  A battery from a table of capitals: closed-book ("What is the capital of X?") and
              the same question after a context that names another city as the capital (as in
              NQ-Swap). Greedy vs DeCoRe (top retrieval heads of the census) vs DeCoRe with as
              many random heads; accuracy closed-book, rate of following the context, Wilson
              95% intervals. Time per token of DoLa and DeCoRe vs greedy on the battery, and on
              ``--cost-prompts`` chat prompts of ``--cost-tokens`` new tokens (prefill weighs less).
acceptance    (``--only acceptance``) how often exiting at each layer agrees with the model's next
              token, and 20% of the layers skipped, with the speed-up each implies.
speculative   Tokens/s, acceptance rate and mean accepted length on ``--prompts`` chat prompts of
              ``--new-tokens`` tokens: greedy (transformers), transformers' prompt-lookup decoding,
              and ours with each drafter of ``--drafters`` (``name[:draft_len][@min_prob]``:
              prompt lookup, early exit, trained draft heads), interleaved per prompt; the output of
              every method is compared with greedy's token for token, and the run exits with an
              error naming the prompts where any differs.

Threads: ``--threads auto`` (default) calibrates on this machine first (a verify forward timed
with 1 .. cores threads, alternating; the fewest threads within 5% of the fastest) and every
section records the choice; ``--threads N`` fixes it.

    .venv/bin/python bench/decoding.py --truthfulqa ../shared/data/truthfulqa/TruthfulQA.csv \
        [--questions 200] [--prompts 20] [--new-tokens 256] [--only ...] [--threads auto|N]
        [--drafters prompt-lookup:4,heads:2@0.5,...] [--out bench/results/decoding.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from harness import Log, conditions, load_average, uptime  # noqa: E402  (bench/ is on the path when a benchmark runs)
from intervals import wilson  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.infer.decoding.decore import random_heads, retrieval_heads
from lmatlas.infer.decoding.dola import candidate_layers, js_divergence
from lmatlas.infer.decoding.draft_heads import DraftHeadsError
from lmatlas.infer.decoding.speculative import speculative_generate
from lmatlas.infer.decoding.strategies import DeCoRe, Dola
from lmatlas.model.readout import LayerTap, exit_logits, exit_logits_at

log = Log("bench_decoding")


def bootstrap_diff(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> dict:
    """Mean of ``b - a`` with a paired-bootstrap 95% interval."""
    rng = random.Random(seed)
    diffs = [y - x for x, y in zip(a, b)]
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(n))
    return {"diff": statistics.fmean(diffs), "ci95": [means[int(0.025 * n)], means[int(0.975 * n) - 1]]}


# -- TruthfulQA -------------------------------------------------------------------------------------
#: Cheaper DoLa variants scored beside the published method: the premature layers read on the final
#: layer's top-k tokens only (plus the answer token, so multiple choice can score it), or half the layers.
TOP_KS = (50, 200)


def answer_scores(model, layers, question: str, answer: str) -> dict[str, float]:
    """The reference scorer (one uncached forward per answer; :func:`question_scores` is the fast one). Log-score of `` answer`` after ``Q: question\nA:`` by each method: ``greedy`` (the model's
    log-likelihood), ``dola`` (published: the premature layer chosen per token by the largest JSD over
    the whole vocabulary among ``layers``), ``dola_top{k}`` (JSD and contrast over the final layer's
    top-k tokens and the answer token, renormalised there) and ``dola_half`` (every other layer of
    ``layers``)."""
    prompt = model.tokenizer(f"Q: {question}\nA:", add_special_tokens=False)["input_ids"]
    full = model.tokenizer(f"Q: {question}\nA: {answer}", add_special_tokens=False)["input_ids"]
    n = len(prompt)
    ids = torch.tensor([full])
    with torch.no_grad(), LayerTap(model.hf, layers, positions="all") as tap:
        final = model.hf(input_ids=ids, use_cache=False).logits[0, n - 1 : -1].float()  # [m, V]
        target = ids[0, n:]
        hidden = torch.stack([tap.last[layer][0, n - 1 : -1] for layer in layers])  # [L, m, d]
        premature = exit_logits(model.hf, hidden)  # [L, m, V]
        out = {"greedy": float(F.log_softmax(final, -1).gather(1, target[:, None]).sum())}
        out["dola"] = _contrast_score(final, premature, target)
        out["dola_half"] = _contrast_score(final, premature[::2], target)
        for k in TOP_KS:
            inside = with_answer(final.topk(k, dim=-1).indices, target)  # [m, k]
            cheap = exit_logits_at(model.hf, hidden, inside)  # [L, m, k]: only k rows of the unembedding
            out[f"dola_top{k}"] = _contrast_score(final.gather(1, inside), cheap, torch.zeros_like(target))
    return out


def question_scores(model, layers, question: str, answers: list[str]) -> dict[str, dict[str, float]]:
    """:func:`answer_scores` of every answer of a question from two forwards: the prompt once (its KV
    cache reused) and the answers in one right-padded batch.

    ``Q: question\\nA:`` is ``n`` tokens; for each answer the prefix ``full[:n - 1]`` goes into the
    cache (answers whose prefix tokenises differently get their own), and the batch holds
    ``full[n - 1 : -1]`` per answer, whose logits predict the answer tokens ``full[n:]``. Padding
    sits after an answer's last token, so causal attention keeps it out of every position scored.
    Every method's score comes from the same hidden states (:func:`method_scores`)."""
    tokenizer = model.tokenizer
    n = len(tokenizer(f"Q: {question}\nA:", add_special_tokens=False)["input_ids"])
    fulls = {a: tokenizer(f"Q: {question}\nA: {a}", add_special_tokens=False)["input_ids"] for a in answers}
    groups: dict[tuple, list[str]] = {}
    for answer, ids in fulls.items():
        groups.setdefault(tuple(ids[: n - 1]), []).append(answer)
    out = {}
    for prefix, group in groups.items():
        suffixes = [fulls[a][n - 1 :] for a in group]  # [last prompt token, answer tokens...]
        out.update(zip(group, _batch_scores(model, layers, list(prefix), suffixes)))
    return {a: out[a] for a in answers}


def _batch_scores(model, layers, prefix: list[int], suffixes: list[list[int]]) -> list[dict[str, float]]:
    """Scores of each ``suffix[1:]`` after ``prefix + suffix[:1]``: the prefix's cache repeated over the batch.

    Positions where answers share every token so far (at least the first, the prompt's last token)
    have the same hidden states: the full-vocabulary readouts are computed once per distinct one."""
    from transformers import DynamicCache

    inputs = [s[:-1] for s in suffixes]
    width = max(len(i) for i in inputs)
    batch = torch.tensor([i + [i[-1]] * (width - len(i)) for i in inputs])  # [B, width], right-padded
    cache = DynamicCache(config=model.hf.config) if prefix else None
    with torch.no_grad():
        if prefix:
            model.hf(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(inputs))
        with LayerTap(model.hf, layers, positions="all") as tap:
            logits = model.hf(input_ids=batch, past_key_values=cache, use_cache=prefix != []).logits.float()
        hidden = torch.stack([tap.last[layer] for layer in layers])  # [L, B, width, d]
        where, first = shared_positions(suffixes)
        b_idx, j_idx = torch.tensor(first).T
        full = position_distributions(model, logits[b_idx, j_idx], hidden[:, b_idx, j_idx])  # {method: [U, V]}
        rows = []
        for b, suffix in enumerate(suffixes):
            m, target = len(suffix) - 1, torch.tensor(suffix[1:])
            out = {name: float(dist[where[b], target].sum()) for name, dist in full.items()}
            rows.append(out | top_k_variant_scores(model, logits[b, :m], hidden[:, b, :m], target))
    return rows


def shared_positions(suffixes: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """``(where, first)``: ``where[b][j]`` numbers the distinct token prefixes ``suffixes[b][: j + 1]``
    (equal prefixes, equal numbers), and ``first[u]`` is the ``(b, j)`` where prefix ``u`` first occurs."""
    distinct: dict[tuple, int] = {}
    where, first = [], []
    for b, suffix in enumerate(suffixes):
        row = []
        for j in range(len(suffix) - 1):
            key = tuple(suffix[: j + 1])
            if key not in distinct:
                distinct[key] = len(first)
                first.append((b, j))
            row.append(distinct[key])
        where.append(row)
    return where, first


def position_distributions(
    model, final: torch.Tensor, hidden: torch.Tensor, chunk: int = 16
) -> dict[str, torch.Tensor]:
    """``{method: [U, V]}`` log-distributions of the next token at ``U`` positions from the final logits
    ``[U, V]`` and the premature layers' hidden states ``[L, U, d]``: ``greedy`` (the model's),
    ``dola`` (the published contrast, premature layer of largest JSD) and ``dola_half`` (every other
    candidate layer: the same divergences, every other one). ``chunk`` positions at a time bound the
    ``[L, chunk, V]`` readout's memory."""
    out: dict[str, list[torch.Tensor]] = {"greedy": [], "dola": [], "dola_half": []}
    for start in range(0, final.shape[0], chunk):
        f = final[start : start + chunk]
        log_final = F.log_softmax(f, -1)
        premature = exit_logits(model.hf, hidden[:, start : start + chunk])  # [L, c, V]: one matmul
        jsd = js_divergence(f, premature)  # [L, c]
        out["greedy"].append(log_final)
        for name, chosen in (("dola", jsd.argmax(0)), ("dola_half", 2 * jsd[::2].argmax(0))):
            picked = premature[chosen, torch.arange(f.shape[0])]  # [c, V]
            out[name].append(F.log_softmax(log_final - F.log_softmax(picked, -1), -1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def top_k_variant_scores(model, final: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``dola_top{k}`` log-scores of ``target`` ``[m]`` (see :func:`answer_scores`) from the final logits
    ``[m, V]`` and the premature hidden states ``[L, m, d]``: ``k`` rows of the unembedding per position."""
    out = {}
    for k in TOP_KS:
        inside = with_answer(final.topk(k, dim=-1).indices, target)  # [m, k]
        cheap = exit_logits_at(model.hf, hidden, inside)  # [L, m, k]
        out[f"dola_top{k}"] = _contrast_score(final.gather(1, inside), cheap, torch.zeros_like(target))
    return out


def with_answer(top: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[m, k]`` token ids: the answer token first, then the top-k ids without it (the last one
    dropped when the answer is not among them)."""
    present = top == target[:, None]  # [m, k]
    answer_first = top.gather(1, present.logical_not().int().argsort(dim=1, stable=True))
    added = torch.cat([target[:, None], top[:, :-1]], 1)
    return torch.where(present.any(1, keepdim=True), answer_first, added)


def _contrast_score(final: torch.Tensor, premature: torch.Tensor, target: torch.Tensor) -> float:
    """Sum over answer tokens of ``log_softmax(log q_N - log q_M)[target]``, ``M`` the largest-JSD layer."""
    chosen = js_divergence(final, premature).argmax(0)  # [m]
    picked = premature[chosen, torch.arange(final.shape[0])]
    dola = F.log_softmax(F.log_softmax(final, -1) - F.log_softmax(picked, -1), -1)
    return float(dola.gather(1, target[:, None]).sum())


def split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


#: The methods scored on TruthfulQA, in the record's order.
METHODS = ("greedy", "dola", "dola_half", *(f"dola_top{k}" for k in TOP_KS))


def read_questions(path: str, questions: int = 0) -> list[dict]:
    """The first ``questions`` rows of TruthfulQA.csv (0 = all) as ``{"question", "best", "correct",
    "incorrect", "answers"}`` (the best answer is counted correct; ``answers`` without repeats)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    items = []
    for row in rows[:questions] if questions else rows:
        best, correct = row["Best Answer"].strip(), split_answers(row["Correct Answers"])
        incorrect = split_answers(row["Incorrect Answers"])
        if best not in correct:
            correct = [best] + correct
        answers = list(dict.fromkeys(correct + incorrect))
        items.append(
            {"question": row["Question"], "best": best, "correct": correct, "incorrect": incorrect, "answers": answers}
        )
    return items


def multiple_choice(scores: dict[str, float], item: dict) -> tuple[float, float]:
    """``(mc1, mc2)`` of one question from each answer's log-score: MC1 = 1 when the best answer scores above
    every incorrect one; MC2 = the normalised probability mass of the correct answers."""
    mc1 = float(all(scores[item["best"]] > scores[a] for a in item["incorrect"]))
    top = max(scores.values())
    p_true = sum(math.exp(scores[a] - top) for a in item["correct"])
    p_false = sum(math.exp(scores[a] - top) for a in item["incorrect"])
    return mc1, p_true / (p_true + p_false)


def truthfulqa(model, path: str, questions: int, minutes: float | None = None, first: int = 0, checkpoint=None) -> dict:
    """MC1 / MC2 of greedy, DoLa and its variants on ``questions`` questions from row ``first`` (0 = to the
    end), each question's answers scored by :func:`question_scores`; with ``minutes``, stops after the
    question that passes the time budget (the report says how many were scored). ``per_question`` keeps
    every question's MC1 and MC2 per method (MC2 rounded to 1e-6); ``checkpoint(partial)`` receives the
    report so far every 10 questions (a run stopped early keeps them)."""
    items = read_questions(path)
    items = items[first : first + questions] if questions else items[first:]
    layers = candidate_layers(model.hf, "high")
    mc = {method: {"mc1": [], "mc2": []} for method in METHODS}
    start = time.perf_counter()

    def report() -> dict:
        scored = len(mc["greedy"]["mc1"])
        per_question = {m: {"mc1": mc[m]["mc1"], "mc2": [round(v, 6) for v in mc[m]["mc2"]]} for m in mc}
        return {
            "questions": scored,
            "first_question": first,
            "requested": len(items),
            "of": 817,
            "subset": f"rows {first} to {first + scored - 1} of the file (0-based)",
            "premature_layers": layers,
            "scorer": "question_scores: the prompt's KV once, the answers in one right-padded forward",
            "seconds": time.perf_counter() - start,
            **summarise(per_question),
            "per_question": per_question,
        }

    for i, item in enumerate(items):
        scores = question_scores(model, layers, item["question"], item["answers"])
        for method in METHODS:
            mc1, mc2 = multiple_choice({a: v[method] for a, v in scores.items()}, item)
            mc[method]["mc1"].append(mc1)
            mc[method]["mc2"].append(mc2)
        if (i + 1) % 10 == 0:
            log(f"truthfulqa {first + i + 1} ({i + 1}/{len(items)}, {time.perf_counter() - start:.0f}s)")
            if checkpoint is not None:
                checkpoint(report() | {"partial": True})
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            log(f"truthfulqa: time budget of {minutes} min reached after {i + 1} questions")
            break
    return report()


def summarise(per_question: dict) -> dict:
    """``{"mc1": ..., "mc2": ...}``: each method's mean and paired-bootstrap intervals of DoLa - greedy and
    of each variant - DoLa, from ``per_question[method][metric]`` lists (questions in the same order)."""
    out = {}
    for metric in ("mc1", "mc2"):
        rows = {m: per_question[m][metric] for m in METHODS}
        out[metric] = {m: statistics.fmean(v) for m, v in rows.items()}
        out[metric]["dola_minus_greedy"] = bootstrap_diff(rows["greedy"], rows["dola"])
        for method in METHODS[2:]:
            out[metric][f"{method}_minus_dola"] = bootstrap_diff(rows["dola"], rows[method])
    return out


def merge_truthfulqa(paths: list[str]) -> dict:
    """One truthfulqa report from the ``truthfulqa`` sections of several records (runs over row ranges,
    ``--first-question``, or earlier merges: their ``parts`` are taken apart again), questions in file
    order; ``parts`` keeps each run's rows, command, commit and load. Ranges must not overlap."""
    runs = sorted(
        (run for p in paths for run in _runs(json.load(open(p))["sections"]["truthfulqa"])), key=lambda r: r["rows"]
    )
    for a, b in zip(runs, runs[1:]):
        if a["rows"][1] > b["rows"][0]:
            raise ValueError(f"rows {a['rows']} and {b['rows']} overlap")
    per_question = {m: {k: [v for r in runs for v in r["per_question"][m][k]] for k in ("mc1", "mc2")} for m in METHODS}
    ranges = [r["rows"] for r in runs]
    contiguous = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and ranges[0][0] == 0
    return {
        "questions": len(per_question["greedy"]["mc1"]),
        "of": 817,
        "subset": "the first rows of the file" if contiguous else f"rows {ranges} of the file (0-based, end excluded)",
        "premature_layers": runs[0]["premature_layers"],
        "scorer": runs[0]["scorer"],
        "seconds": sum(r["seconds"] for r in runs),
        **summarise(per_question),
        "parts": [{k: r[k] for k in ("rows", "seconds", "conditions", "partial")} for r in runs],
        "per_question": per_question,
    }


def _runs(section: dict) -> list[dict]:
    """The runs of a truthfulqa section: itself (one range from ``first_question``) or, for a merge, its parts
    with their slices of ``per_question``."""
    common = {"premature_layers": section["premature_layers"], "scorer": section["scorer"]}
    if "parts" not in section:
        first = section["first_question"]
        rows = [first, first + section["questions"]]
        keep = {k: section[k] for k in ("seconds", "conditions", "per_question")}
        return [{**common, **keep, "rows": rows, "partial": section.get("partial", False)}]
    runs, start = [], 0
    for part in section["parts"]:
        size = part["rows"][1] - part["rows"][0]
        sliced = {m: {k: v[start : start + size] for k, v in d.items()} for m, d in section["per_question"].items()}
        runs.append({**common, **part, "per_question": sliced})
        start += size
    return runs


def scorer_check(model, path: str, questions: int) -> dict:
    """The batched scorer against one uncached forward per answer (:func:`answer_scores`) on the first
    ``questions``: the largest difference of any answer's score per method, how many questions' MC1
    agree, the largest MC2 difference, and both paths' seconds (alternating which runs first)."""
    layers = candidate_layers(model.hf, "high")
    score_diff = {m: 0.0 for m in METHODS}
    mc1_same, mc2_diff, seconds = (
        {m: 0 for m in METHODS},
        {m: 0.0 for m in METHODS},
        {"one_by_one": 0.0, "batched": 0.0},
    )
    items = read_questions(path, questions)
    for i, item in enumerate(items):
        runs = {
            "one_by_one": lambda: {a: answer_scores(model, layers, item["question"], a) for a in item["answers"]},
            "batched": lambda: question_scores(model, layers, item["question"], item["answers"]),
        }
        got = {}
        for name in list(runs)[:: 1 if i % 2 else -1]:
            start = time.perf_counter()
            got[name] = runs[name]()
            seconds[name] += time.perf_counter() - start
        for m in METHODS:
            old = {a: v[m] for a, v in got["one_by_one"].items()}
            new = {a: v[m] for a, v in got["batched"].items()}
            score_diff[m] = max(score_diff[m], *(abs(old[a] - new[a]) for a in old))
            (o1, o2), (n1, n2) = multiple_choice(old, item), multiple_choice(new, item)
            mc1_same[m] += o1 == n1
            mc2_diff[m] = max(mc2_diff[m], abs(o2 - n2))
        log(f"scorer check {i + 1}/{len(items)}: {seconds}")
    return {
        "questions": len(items),
        "answers": sum(len(item["answers"]) for item in items),
        "max_abs_score_diff": score_diff,
        "mc1_identical_questions": mc1_same,
        "max_abs_mc2_diff": mc2_diff,
        "seconds": seconds,
        "speedup": seconds["one_by_one"] / seconds["batched"],
    }


# -- context faithfulness --------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Switzerland", "Bern"),
    ("Hungary", "Budapest"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Cuba", "Havana"),
    ("Colombia", "Bogota"),
    ("Ukraine", "Kyiv"),
]


def battery(countries: int = 0) -> list[dict]:
    """Closed-book and contradicting-context questions; the swapped capital is another row's."""
    items = []
    for i, (country, capital) in enumerate(CAPITALS[: countries or len(CAPITALS)]):
        other = CAPITALS[(i + 7) % len(CAPITALS)][1]
        question = f"What is the capital of {country}? Answer with the city name only."
        items.append({"kind": "closed", "prompt": question, "truth": capital, "swap": other})
        items.append(
            {
                "kind": "context",
                "truth": capital,
                "swap": other,
                "prompt": f"Context: The capital of {country} is {other}.\n{question}",
            }
        )
    return items


def generate_with_strategy(model, prompt: str, max_new_tokens: int, strategy) -> dict:
    """``{"text", "seconds", "new_tokens"}`` of one chat prompt under ``strategy`` (``lmatlas.generate``)."""
    chat = getattr(model.tokenizer, "chat_template", None) is not None  # tiny test models have none
    out = lmatlas.generate(model, prompt, max_new_tokens, strategy=strategy, chat=chat)
    return {"text": out.text, "seconds": out.seconds, "new_tokens": len(out.token_ids)}


def dola_variants(model) -> dict:
    """The published DoLa and its cheaper variants as strategy values (see :data:`TOP_KS`)."""
    half = candidate_layers(model.hf, "high")[::2]
    return {
        "dola": Dola(),
        "dola_half": Dola(premature_layers=half),
        **{f"dola_top{k}": Dola(top_k=k) for k in TOP_KS},
    }


def faithfulness(model, heads: list[str], control: list[str], countries: int = 0, new_tokens: int = 8) -> dict:
    methods = {
        "greedy": "greedy",
        "decore": DeCoRe(heads=tuple(heads)),
        "decore_random_heads": DeCoRe(heads=tuple(control)),
        "dola": Dola(),
    }
    items = battery(countries)
    out: dict = {"items": len(items), "heads": heads, "random_heads": control, "methods": {}}
    for name, strategy in methods.items():
        closed = context_follow = context_truth = 0
        seconds = tokens = 0.0
        for item in items:
            report = generate_with_strategy(model, item["prompt"], new_tokens, strategy)
            text = report["text"].lower()
            seconds += report["seconds"]
            tokens += report["new_tokens"]
            if item["kind"] == "closed":
                closed += item["truth"].lower() in text
            else:
                context_follow += item["swap"].lower() in text
                context_truth += item["truth"].lower() in text
        n = len(items) // 2
        out["methods"][name] = {
            "closed_book_accuracy": closed / n,
            "closed_ci95": wilson(closed, n),
            "follows_context": context_follow / n,
            "follows_ci95": wilson(context_follow, n),
            "answers_memory_despite_context": context_truth / n,
            "seconds_per_token": seconds / max(tokens, 1),
        }
        log(f"faithfulness {name}: {out['methods'][name]}")
    base = out["methods"]["greedy"]["seconds_per_token"]
    for name in out["methods"]:
        out["methods"][name]["time_per_token_vs_greedy"] = out["methods"][name]["seconds_per_token"] / base
    return out


def cost_per_token(model, heads: list[str] | None, prompts: int, new_tokens: int, repeats: int = 1) -> dict:
    """Seconds per generated token of greedy, DoLa (published and its cheaper variants) and, with ``heads``,
    DeCoRe on the same chat prompts (longer outputs than the battery's, so the prompt's prefill weighs
    less). Methods are interleaved per prompt in an order that rotates from round to round (``repeats``
    passes over the prompts), so a change of load hits them alike: ``vs_greedy`` is total time per
    token against greedy's, ``median_round_ratio`` the median over rounds of the same ratio, and
    ``cpu_vs_greedy`` the same from the process's CPU time (what the computation costs, whatever else
    runs on the machine; with one torch thread it is the time the method would take alone)."""
    methods = {"greedy": "greedy", **dola_variants(model)}
    if heads:
        methods["decore"] = DeCoRe(heads=tuple(heads))
    for strategy in methods.values():  # warm-up
        generate_with_strategy(model, SPEC_PROMPTS[0], 4, strategy)
    names = list(methods)
    rounds = []  # {method: (seconds, tokens, cpu seconds)} per (repeat, prompt)
    for _ in range(repeats):
        for prompt in SPEC_PROMPTS[:prompts]:
            shift = len(rounds) % len(names)
            row = {}
            for name in names[shift:] + names[:shift]:
                cpu = time.process_time()
                report = generate_with_strategy(model, prompt, new_tokens, methods[name])
                row[name] = (report["seconds"], report["new_tokens"], time.process_time() - cpu)
            rounds.append(row)
            log(
                f"cost round {len(rounds)}/{repeats * prompts}: "
                + ", ".join(f"{k} {s:.1f}s (cpu {c:.1f}s)" for k, (s, _, c) in row.items())
            )
    out = {"prompts": prompts, "repeats": repeats, "new_tokens": new_tokens, "methods": {}}
    per_token = {name: [s / max(n, 1) for s, n, _ in (row[name] for row in rounds)] for name in names}
    totals = {name: [sum(row[name][i] for row in rounds) for i in range(3)] for name in names}
    greedy_s, greedy_n, greedy_cpu = totals["greedy"]
    for name in names:
        seconds, tokens, cpu = totals[name]
        out["methods"][name] = {
            "seconds_per_token": seconds / max(tokens, 1),
            "cpu_seconds_per_token": cpu / max(tokens, 1),
            "tokens": tokens,
            "vs_greedy": seconds / max(tokens, 1) / (greedy_s / max(greedy_n, 1)),
            "cpu_vs_greedy": cpu / max(tokens, 1) / (greedy_cpu / max(greedy_n, 1)),
            "median_round_ratio": statistics.median(m / g for m, g in zip(per_token[name], per_token["greedy"])),
        }
    out["targets"] = {"dola_max": 1.3, "decore_max": 2.2}
    return out


# -- acceptance profile ----------------------------------------------------------------------------
def acceptance(model, prompts: int, new_tokens: int, atlas: str | None) -> dict:
    """Early-exit agreement per layer, and for 20% of the layers skipped (the least important in the
    atlas when it has every layer's importance, else the blocks with the smallest relative write)."""
    from lmatlas.infer.decoding.acceptance import acceptance_profile, least_important_layers

    n = model.layout.n_layers
    count = max(1, round(0.2 * n))
    chosen, how = None, None
    if atlas is not None:
        try:
            chosen = least_important_layers(atlas, 0.2)
            how = "atlas importance (MLP + heads' loss increase)"
            if len(chosen) != count:
                chosen = None
        except Exception as error:  # an atlas without importance tables
            log(f"atlas importance unavailable: {error}")
    texts = [f"{p}" for p in SPEC_PROMPTS[:prompts]]
    if chosen is None:
        cache = model.run(texts[0], capture=["resid.pre", "resid.post"])
        ratio = [
            float((cache[f"L{l}.resid.post"] - cache[f"L{l}.resid.pre"]).norm() / cache[f"L{l}.resid.pre"].norm())
            for l in range(n)
        ]
        chosen = sorted(sorted(range(n), key=lambda l: ratio[l])[:count])
        how = "smallest relative write |resid.post - resid.pre| / |resid.pre| (no atlas importance for every layer)"
    profile = acceptance_profile(model, texts, new_tokens, skip_sets={"skip_20pct": chosen})
    profile["skip_set_chosen_by"] = how
    return profile


# -- speculative -----------------------------------------------------------------------------------
SPEC_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Give me a recipe for a simple tomato soup.",
    "What are the main causes of the French Revolution?",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Describe the water cycle to a ten-year-old.",
    "List ten tips for staying productive while working from home.",
    "Summarise the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?",
    "Write a polite email asking a colleague to review a document.",
    "Explain the difference between weather and climate.",
    "What is machine learning? Explain with examples.",
    "Write a poem about autumn leaves.",
    "How do vaccines work?",
    "Repeat this list and add one more item: apples, bananas, cherries, dates, elderberries.",
    "Rewrite this sentence in the passive voice: The committee approved the new budget on Monday.",
    "Here is some code:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\nAdd a mul function in the same style and show all three.",
    "Describe a typical day in the life of a farmer.",
    "Why is the sky blue?",
    "Compare cats and dogs as pets.",
]


#: The drafters of the speculative section, ``name[:draft_len][@min_prob]`` (draft heads: draft only while
#: each head's probability is at least ``min_prob``). The verify curve (decoding_threads.json) prices a
#: forward over 1 + k tokens at 1.14x a step for k = 1, 1.21x for 2, 1.5x for 3-4: short drafts pay first.
DEFAULT_DRAFTERS = "prompt-lookup:4,prompt-lookup:2,heads:1,heads:2@0.5,heads:3@0.5,early-exit:1"


def parse_drafters(spec: str, default_len: int) -> list[tuple[str, str, int, float]]:
    """``"heads:2@0.5,prompt-lookup"`` -> ``[(label, drafter name, draft_len, min_prob), ...]``."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, prob = item.partition("@")
        name, _, length = name.partition(":")
        k, min_prob = int(length or default_len), float(prob or 0.0)
        label = f"ours_{name.replace('-', '_')}_k{k}" + (f"_p{min_prob:g}" if min_prob else "")
        out.append((label, name, k, min_prob))
    return out


def build_drafters(model, spec: str, default_len: int, heads_path: str | None) -> tuple[dict, dict | None]:
    """``{label: (drafter, draft_len)}`` for ``spec`` (draft heads left out, with a log line, when none are
    trained) and the heads' training record."""
    from lmatlas.infer.decoding.drafters import make_drafter

    drafters, heads_meta = {}, None
    for label, name, k, min_prob in parse_drafters(spec, default_len):
        try:
            drafter = make_drafter(model, name, heads_path=heads_path, min_prob=min_prob)
        except DraftHeadsError as error:
            log(f"{label} left out: {error}")
            continue
        if name == "heads":
            heads_meta = drafter.heads.meta.get("train")
        drafters[label] = (drafter, k)
    return drafters, heads_meta


def verify_step(model, draft_len: int, context: int = 256):
    """A verifying forward over ``1 + draft_len`` tokens on a ``context``-token cache (the step speculative
    decoding repeats), for :func:`lmatlas.machine.calibrate`."""
    from transformers import DynamicCache

    from lmatlas.infer.decoding.speculative import crop_to

    limit = getattr(model.hf.config, "max_position_embeddings", None) or context + 16
    context = min(context, limit - 1 - draft_len)
    vocab = model.hf.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    verify = torch.randint(0, vocab, (1, 1 + draft_len), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.hf.config)
    with torch.no_grad():
        model.hf(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step():
        with torch.no_grad():
            model.hf(input_ids=verify, past_key_values=cache, use_cache=True)
        crop_to(cache, context)

    return step


def speculative(
    model,
    n_prompts: int,
    new_tokens: int,
    drafters: dict,
    heads_meta: dict | None = None,
    early_exit_prompts: int | None = None,
    minutes: float | None = None,
) -> dict:
    """Greedy (transformers), transformers' prompt lookup and every drafter of ``drafters``
    (``{label: (drafter, draft_len)}``) on the same prompts, interleaved per prompt in an order that
    rotates from prompt to prompt (no method always runs first); every output is
    compared with greedy's token for token (``all_identical``). The early-exit drafters (slow on a CPU)
    run on the first ``early_exit_prompts`` prompts only, their ratio taken against greedy on those."""
    from lmatlas.model.generation import prompt_ids

    prompts = (SPEC_PROMPTS * 2)[:n_prompts]
    lookup_len = max([k for label, (_, k) in drafters.items() if "prompt_lookup" in label] or [4])
    pad = model.tokenizer.eos_token_id
    runs = {name: [] for name in ["greedy", "hf_prompt_lookup", *drafters]}  # (prompt, seconds, tokens, identical)
    accepted = {name: [] for name in drafters}
    drafted = {name: [] for name in drafters}  # drafts proposed per verifying forward
    mismatches = []
    chat = getattr(model.tokenizer, "chat_template", None) is not None  # tiny test models have none
    warm = prompt_ids(model, prompts[0], chat)["input_ids"]
    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        model.hf.generate(input_ids=warm, do_sample=False, max_new_tokens=8, pad_token_id=pad)
    for drafter, k in drafters.values():
        speculative_generate(model, warm, drafter, 8, draft_len=k)
    begin = time.perf_counter()
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(model, prompt, chat)["input_ids"]
        jobs = prompt_jobs(model, ids, new_tokens, drafters, lookup_len)
        if early_exit_prompts is not None and i >= early_exit_prompts:
            jobs = {name: job for name, job in jobs.items() if "early_exit" not in name}
        names = list(jobs)
        outputs = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:  # the order rotates prompt by prompt
            outputs[name] = jobs[name]()
        reference = outputs["greedy"][1]
        for name, (seconds, tokens, result) in outputs.items():
            runs[name].append((i, seconds, len(tokens), tokens == reference))
            if tokens != reference:
                mismatches.append({"prompt": i, "method": name})
            if result is not None:
                accepted[name].extend(result.accepted)
                drafted[name].extend(result.drafted)
        log(
            f"speculative {i + 1}/{len(prompts)}: "
            + ", ".join(f"{k} {sum(r[1] for r in v):.1f}s" for k, v in runs.items())
        )
        if minutes is not None and time.perf_counter() - begin > minutes * 60:
            log(f"speculative: time budget of {minutes} min reached after {i + 1} prompts")
            break
    out = {
        "prompts": len(runs["greedy"]),
        "requested_prompts": len(prompts),
        "new_tokens": new_tokens,
        "drafters": {name: {"draft_len": k} for name, (_, k) in drafters.items()},
        "greedy_tokens": sum(n for _, _, n, _ in runs["greedy"]),
        "draft_heads": heads_meta,
        "all_identical": not mismatches,
        "mismatches": mismatches,
        "methods": {name: method_summary(rows, runs["greedy"]) for name, rows in runs.items() if rows},
    }
    for name in drafters:
        if runs[name]:
            out["methods"][name].update(acceptance_summary(accepted[name], drafted[name]))
    return out


def prompt_jobs(model, ids, new_tokens: int, drafters: dict, lookup_len: int) -> dict:
    """``{method: run}`` for one prompt; ``run() -> (seconds, new token ids, speculative result or None)``."""
    pad = model.tokenizer.eos_token_id

    def hf(**extra):
        def run():
            with torch.no_grad():
                start = time.perf_counter()
                out = model.hf.generate(
                    input_ids=ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad, **extra
                )
                return time.perf_counter() - start, out[0, ids.shape[1] :].tolist(), None

        return run

    def ours(drafter, k):
        def run():
            result = speculative_generate(model, ids, drafter, new_tokens, draft_len=k)
            return result.seconds, result.token_ids, result

        return run

    jobs = {"greedy": hf(), "hf_prompt_lookup": hf(prompt_lookup_num_tokens=lookup_len)}
    return jobs | {name: ours(drafter, k) for name, (drafter, k) in drafters.items()}


def method_summary(rows: list, greedy_rows: list) -> dict:
    """Tokens/s of one method's ``rows`` ``(prompt, seconds, tokens, identical)`` and its ratio to greedy
    on the same prompts (total tokens / total seconds, and the median of per-prompt ratios)."""
    greedy_by_prompt = {i: (s, n) for i, s, n, _ in greedy_rows}
    seconds, tokens = sum(r[1] for r in rows), sum(r[2] for r in rows)
    base_s = sum(greedy_by_prompt[r[0]][0] for r in rows)
    base_n = sum(greedy_by_prompt[r[0]][1] for r in rows)
    per_prompt = [(greedy_by_prompt[i][0] / greedy_by_prompt[i][1]) / (sec / max(n, 1)) for i, sec, n, _ in rows]
    return {
        "prompts": len(rows),
        "tokens_per_s": tokens / seconds,
        "ratio_vs_greedy": (tokens / seconds) / (base_n / base_s),
        "median_ratio_per_prompt": statistics.median(per_prompt),
        "identical_to_greedy": f"{sum(r[3] for r in rows)}/{len(rows)}",
        "median_s_per_prompt": statistics.median(r[1] for r in rows),
        "seconds_per_prompt": [round(r[1], 3) for r in rows],
    }


def acceptance_summary(accepted: list[int], drafted: list[int]) -> dict:
    """How much of the drafts the verification kept: ``acceptance_rate`` (accepted / drafted tokens),
    ``acceptance_when_drafting`` (the same over forwards that had a draft), tokens per verifying forward."""
    with_draft = [(a, d) for a, d in zip(accepted, drafted) if d]
    return {
        "verify_forwards": len(accepted),
        "forwards_with_draft": len(with_draft),
        "acceptance_rate": sum(accepted) / max(sum(drafted), 1),
        "first_token_acceptance": sum(a > 0 for a, _ in with_draft) / max(len(with_draft), 1),
        "mean_accepted_length": statistics.fmean(a + 1 for a in accepted) if accepted else None,
        "drafted_histogram": {str(k): drafted.count(k) for k in sorted(set(drafted))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--truthfulqa", default="../shared/data/truthfulqa/TruthfulQA.csv")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument(
        "--check-questions", type=int, default=20, help="Questions of truthfulqa_check (batched vs one by one)."
    )
    parser.add_argument("--first-question", type=int, default=0, help="truthfulqa starts at this row (0-based).")
    parser.add_argument("--merge", default="", help="truthfulqa_merge: records of runs over consecutive rows.")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--countries", type=int, default=0, help="Capitals in the battery (0 = all 40).")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--cost-prompts", type=int, default=4, help="Prompts for DoLa / DeCoRe time per token.")
    parser.add_argument("--cost-tokens", type=int, default=64, help="New tokens per prompt for time per token.")
    parser.add_argument("--cost-repeats", type=int, default=1, help="Passes over the cost prompts (order rotates).")
    parser.add_argument("--draft-len", type=int, default=4, help="Draft length of a drafter given without one.")
    parser.add_argument(
        "--drafters",
        default=DEFAULT_DRAFTERS,
        help="Speculative drafters, name[:draft_len][@min_prob] separated by commas.",
    )
    parser.add_argument(
        "--threads",
        default="auto",
        help="Torch threads: a number, or auto (calibrate: a verify forward timed with 1..cores threads, "
        "alternating, the fewest within 5%% of the fastest).",
    )
    parser.add_argument(
        "--early-exit-prompts",
        type=int,
        default=None,
        help="Run the (slow on CPU) early-exit drafter on the first N prompts only.",
    )
    parser.add_argument("--retrieval-heads", type=int, default=10)
    parser.add_argument("--heads-file", default=None)
    parser.add_argument("--atlas", default=None, help="Take retrieval heads from this atlas (else run the census).")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="Time budget of the truthfulqa and speculative sections (each stops after the item "
        "that passes it and reports how many it did).",
    )
    parser.add_argument("--only", default="truthfulqa,faithfulness,speculative")
    parser.add_argument("--out", default="bench/results/decoding.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = lmatlas.load()
    calibration = choose_bench_threads(model, args.threads)
    results: dict = {"model": model.card()["source"], "torch_threads": torch.get_num_threads(), "sections": {}}
    if os.path.exists(args.out):
        results["sections"] = json.load(open(args.out)).get("sections", {})

    def section(name: str, compute) -> None:
        before, measured = uptime(), conditions()
        start = time.perf_counter()
        data = compute()
        data.update(
            threads={"torch_threads": torch.get_num_threads(), "choice": calibration},
            conditions={**measured, "load_after": load_average()},
            uptime_before=before,
            uptime_after=uptime(),
            load_avg_after=load_average(),
            section_seconds=round(time.perf_counter() - start, 1),
            command=" ".join(sys.argv),
        )
        results["sections"][name] = data
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        log(f"{name} done")

    def faithfulness_section() -> dict:
        start = time.perf_counter()
        heads = retrieval_heads(model, top=args.retrieval_heads, atlas=args.atlas)
        census_seconds = time.perf_counter() - start
        log(f"retrieval heads {heads} ({census_seconds:.0f}s)")
        control = random_heads(model, len(heads), exclude=heads, seed=0)
        result = faithfulness(model, heads, control, args.countries)
        result["cost_per_token"] = cost_per_token(model, heads, args.cost_prompts, args.cost_tokens)
        log(f"cost per token: {result['cost_per_token']['methods']}")
        return {**result, "census_seconds": round(census_seconds, 1)}

    only = set(args.only.split(","))
    if "acceptance" in only:
        section("acceptance", lambda: acceptance(model, 5, 48, args.atlas))
    if "speculative" in only:
        drafters, heads_meta = build_drafters(model, args.drafters, args.draft_len, args.heads_file)
        section(
            "speculative",
            lambda: speculative(
                model, args.prompts, args.new_tokens, drafters, heads_meta, args.early_exit_prompts, args.minutes
            ),
        )
        if not results["sections"]["speculative"]["all_identical"]:
            sys.exit(f"speculative output differs from greedy: {results['sections']['speculative']['mismatches']}")
    if "faithfulness" in only:
        section("faithfulness", faithfulness_section)
    if "dola_cost" in only:
        section(
            "dola_cost", lambda: cost_per_token(model, None, args.cost_prompts, args.cost_tokens, args.cost_repeats)
        )
    if "truthfulqa_check" in only:
        section("truthfulqa_check", lambda: scorer_check(model, args.truthfulqa, args.check_questions))
    if "truthfulqa" in only:
        started = conditions()

        def checkpoint(partial: dict) -> None:
            results["sections"]["truthfulqa"] = partial | {"conditions": {**started, "load_after": load_average()}}
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=2)

        section(
            "truthfulqa",
            lambda: truthfulqa(model, args.truthfulqa, args.questions, args.minutes, args.first_question, checkpoint),
        )
    if "truthfulqa_merge" in only:
        section("truthfulqa", lambda: merge_truthfulqa(args.merge.split(",")))
    print(json.dumps(results, indent=2))


def choose_bench_threads(model, threads: str) -> dict:
    """Apply ``threads`` (a number, or ``auto``: :func:`lmatlas.machine.calibrate` on a 2-token verify
    forward) and say which was used and why (logged and kept in every section)."""
    from lmatlas.machine import calibrate, choose_threads, use_threads

    if threads != "auto":
        return {"how": "as asked", **use_threads(int(threads), "decode").__dict__}
    rule = choose_threads(workload="decode")
    measured = calibrate(verify_step(model, draft_len=1), rounds=5)
    log(f"threads: calibrated {measured.to_dict()} (the load rule would take {rule.describe()})")
    return {"how": "calibrated", **measured.to_dict(), "rule": rule.__dict__}


if __name__ == "__main__":
    main()
