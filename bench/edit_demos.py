"""Edits on the packaged SmolLM2-135M-Instruct: three findings reproduced with lmatlas.edit.

(a) **A decoded neuron steers generation.** ``decode_neurons`` ranks every neuron's
    output direction through the unembedding; the neuron whose top-10 promoted tokens
    hold the most children words (top-1 `` children``) is clamped with ``Set(neuron, v)``,
    ``v`` = each of ``CLAMP_TIMES`` x its largest activation on the default corpus. Topic words
    (:data:`TOPIC`) are counted in greedy chat continuations of :data:`PROMPTS` (neutral
    requests): unedited, edited, and a control neuron of the same layer (seeded, no topic
    word in its top-10 tokens) clamped to the same value.
(b) **Retrieval heads matter causally** (Wu et al. 2024). The census's retrieval heads
    are zero-ablated (``Ablate(head)`` on each) and copy accuracy is measured on the
    retrieval detector's needle battery: at every teacher-forced copy step, is the
    model's top-1 prediction the next needle token? Also the mean log-probability of
    that token. Against: the same number of random heads (seeds 0, 1, 2; retrieval
    heads excluded), and no ablation.
(c) **A steering vector shifts sentiment.** ``steering_vector`` from :data:`PAIRS`
    (positive vs negative sentences) at ``L{STEER_LAYER}.resid.post``, added with
    ``Add(site, v, alpha)`` at every position and step; sentiment = (positive - negative
    words of :data:`POSITIVE` / :data:`NEGATIVE`) per continuation of :data:`PROMPTS`,
    averaged, per alpha, against a random vector of the same norm (seeded).

Greedy decoding (deterministic), chat template on, one CPU thread (on a shared
2-core machine more threads only add contention). Prints JSON and writes
``bench/results/edit_demos.json``.

    .venv/bin/python bench/edit_demos.py [--only a,b,c] [--new-tokens 40] [--prompts 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
from harness import Log  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.edit import Ablate, Add, Set, steering_vector

log = Log("bench_edit_demos")

RESULTS = Path(__file__).resolve().parent / "results" / "edit_demos.json"

PROMPTS = [
    "Describe a quiet morning in a small town.",
    "Write a short paragraph about the ocean.",
    "What makes a good breakfast?",
    "Tell me about the history of trains.",
    "Describe your ideal weekend.",
    "Write a few sentences about autumn.",
    "What is the best way to learn a new language?",
    "Describe a walk through a forest.",
    "Tell me about a famous painting.",
    "Write a short description of a busy market.",
    "What should I cook for dinner tonight?",
    "Describe a rainy afternoon.",
    "Tell me something interesting about the moon.",
    "Write a paragraph about a river.",
    "What are the benefits of exercise?",
    "Describe an old library.",
    "Tell me about the city of Paris.",
    "Write a few sentences about gardening.",
    "What is a good hobby to start?",
    "Describe a mountain village in winter.",
    "Tell me about the invention of the telephone.",
    "Write a short note about coffee.",
    "Describe a summer evening by the lake.",
    "What makes a house feel like home?",
]
TOPIC = {
    "child",
    "children",
    "childhood",
    "kid",
    "kids",
    "parent",
    "parents",
    "parenting",
    "school",
    "schools",
    "play",
    "playing",
    "toy",
    "toys",
    "baby",
    "babies",
    "boy",
    "boys",
    "girl",
    "girls",
    "son",
    "sons",
    "daughter",
    "daughters",
    "mom",
    "dad",
    "mother",
    "father",
    "family",
    "families",
    "teen",
    "teenagers",
}
CLAMP_TIMES = (4.0, 16.0, 64.0)

PAIRS = [
    ("I love this, it is wonderful.", "I hate this, it is terrible."),
    ("What a beautiful, happy day.", "What an ugly, miserable day."),
    ("The food was delicious and amazing.", "The food was disgusting and awful."),
    ("I feel great and full of joy.", "I feel awful and full of sadness."),
    ("This is the best thing ever.", "This is the worst thing ever."),
    ("Everyone was kind and friendly.", "Everyone was cruel and hostile."),
]
POSITIVE = {
    "good",
    "great",
    "love",
    "loved",
    "lovely",
    "happy",
    "happiness",
    "wonderful",
    "beautiful",
    "joy",
    "joyful",
    "excellent",
    "amazing",
    "best",
    "enjoy",
    "enjoyed",
    "delightful",
    "perfect",
    "fantastic",
    "delicious",
    "kind",
    "friendly",
    "pleasant",
    "bright",
    "warm",
    "peaceful",
    "fun",
    "exciting",
    "glad",
    "cheerful",
    "incredible",
    "awesome",
    "favorite",
    "nice",
    "calm",
    "vibrant",
    "enjoying",
    "excited",
    "thrilled",
    "smile",
    "laughter",
    "delight",
    "success",
    "hope",
}
NEGATIVE = {
    "bad",
    "terrible",
    "hate",
    "hated",
    "sad",
    "sadness",
    "awful",
    "horrible",
    "worst",
    "pain",
    "angry",
    "fear",
    "ugly",
    "poor",
    "disappointing",
    "disgusting",
    "miserable",
    "cruel",
    "hostile",
    "boring",
    "dark",
    "cold",
    "lonely",
    "painful",
    "worse",
    "unfortunately",
    "sick",
    "tired",
    "dull",
    "gloomy",
    "broken",
    "dead",
    "scary",
    "nasty",
    "unpleasant",
    "fail",
    "failed",
    "wrong",
    "harsh",
    "death",
    "grief",
    "cry",
    "crying",
    "suffering",
    "despair",
    "anger",
    "hurt",
    "tragic",
    "bitter",
}
STEER_LAYER = 12
ALPHAS = (2.0, 4.0, 8.0, -4.0)

WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def chat_batch(model, prompts) -> dict[str, torch.Tensor]:
    """The prompts through the chat template, left-padded into one batch ``[n, pos]`` with its attention mask."""
    rows = [
        model.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    width, pad = max(map(len, rows)), model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def continuations(model, prompts, edit, n: int) -> list[str]:
    """Greedy chat continuations of every prompt, in one left-padded batch (the edit acts at every position)."""
    return model.generate(chat_batch(model, prompts), n, edit=edit)


# -- (a) the children neuron -------------------------------------------------------------------------------
def children_neuron(model, prompts, n_new: int) -> dict:
    from lmatlas.decode.neurons import decode_neurons
    from lmatlas.edit.stats import corpus_ids

    log("decoding every neuron (top 10 promoted tokens)")
    dec = decode_neurons(model, k=10, inputs=False)
    children = model.tokenizer.encode(" children", add_special_tokens=False)[0]
    lay = model.layout

    def topic_count(layer, neuron):
        return sum(tok.strip().lower() in TOPIC for tok, _ in dec.neuron(layer, neuron, model.tokenizer)["promoted"])

    top1 = (dec.promoted.ids[:, 0] == children).nonzero()[:, 0].tolist()
    candidates = [(topic_count(r // lay.d_mlp, r % lay.d_mlp), r // lay.d_mlp, r % lay.d_mlp) for r in top1]
    count, layer, index = max(candidates)
    neuron = f"L{layer}.N{index}"
    log(f"neurons with top-1 ' children': {[f'L{l}.N{i} ({c})' for c, l, i in candidates]}; chose {neuron}")

    acts = model.run(corpus_ids(model), capture=[f"L{layer}.mlp.act"], stop_after=layer)[f"L{layer}.mlp.act"]
    peak = float(acts[..., index].max())
    values = {f"x{t:g}": round(t * peak, 2) for t in CLAMP_TIMES}
    generator = torch.Generator().manual_seed(0)
    for control_index in torch.randperm(lay.d_mlp, generator=generator).tolist():
        if topic_count(layer, control_index) == 0:
            break
    control = f"L{layer}.N{control_index}"
    log(f"{neuron}: corpus max activation {peak:.3f}; clamp values {values}; control {control}")

    conditions = {"unedited": None}
    for label, value in values.items():
        conditions[f"edited_{label}"] = Set(neuron, value)
        conditions[f"control_{label}"] = Set(control, value)
    out = {}
    for name, edit in conditions.items():
        log(f"(a) generating: {name}")
        texts = continuations(model, prompts, edit, n_new)
        per_prompt = [sum(w in TOPIC for w in words(t)) for t in texts]
        out[name] = {
            "topic_words": sum(per_prompt),
            "prompts_with_topic": sum(c > 0 for c in per_prompt),
            "words": sum(len(words(t)) for t in texts),
            "per_prompt": per_prompt,
            "examples": texts[:3],
        }
    return {
        "neuron": neuron,
        "candidates_top1_children": [f"L{l}.N{i}" for _, l, i in candidates],
        "decoded_promoted": dec.neuron(layer, index, model.tokenizer)["promoted"],
        "control": control,
        "control_promoted": dec.neuron(layer, control_index, model.tokenizer)["promoted"],
        "corpus_max_activation": round(peak, 4),
        "clamp_values": values,
        "issue_neuron_L28.N931_is_chosen": neuron == "L28.N931",
        "conditions": out,
    }


# -- (b) retrieval heads --------------------------------------------------------------------------------------
def copy_accuracy(model, battery, edit) -> dict:
    """Top-1 accuracy and mean log-prob of the next needle token at every copy step (teacher-forced)."""
    ids, targets = battery.input_ids, battery.meta["targets"]
    correct, logprob, n = 0, 0.0, 0
    for row in range(ids.shape[0]):
        logits = model.run(ids[row : row + 1], replace=edit).logits[0].float()  # [pos, d_vocab]
        steps = (targets[row] >= 0).nonzero()[:, 0]
        want = ids[row, targets[row, steps]]
        lp = torch.log_softmax(logits[steps], -1)
        correct += int((lp.argmax(-1) == want).sum())
        logprob += float(lp.gather(1, want[:, None]).sum())
        n += len(steps)
    return {"accuracy": round(correct / n, 4), "mean_logprob": round(logprob / n, 4), "copy_steps": n}


def retrieval_heads(model, seeds=(0, 1, 2)) -> dict:
    from lmatlas.census.detectors.retrieval import RetrievalDetector
    from lmatlas.census.run import run_census

    log("census: retrieval detector")
    census = run_census(model, ["retrieval"])
    result = census["retrieval"]
    heads = result.heads()
    log(f"retrieval heads: {heads}")
    battery = RetrievalDetector().battery(model, seed=1)  # not the census's seed-0 battery
    everyone = [f"L{l}.H{h}" for l in range(model.layout.n_layers) for h in range(model.layout.n_heads)]
    others = [h for h in everyone if h not in heads]
    conditions = {"none": (None, [])}

    def ablate(names):
        edit = Ablate(names[0])
        for name in names[1:]:
            edit = edit | Ablate(name)
        return edit

    conditions["retrieval_heads"] = (ablate(heads), heads)
    for seed in seeds:
        pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[: len(heads)].tolist()
        chosen = sorted((others[i] for i in pick), key=lambda h: tuple(int(x) for x in h[1:].split(".H")))
        conditions[f"random_seed{seed}"] = (ablate(chosen), chosen)
    out = {}
    for name, (edit, names) in conditions.items():
        log(f"(b) copy accuracy: {name}")
        out[name] = {"heads": names, **copy_accuracy(model, battery, edit)}
    randoms = [out[f"random_seed{s}"]["accuracy"] for s in seeds]
    return {
        "retrieval_heads": heads,
        "scores": {h: round(float(result.score[int(h[1:].split(".H")[0]), int(h.split(".H")[1])]), 3) for h in heads},
        "battery": {
            "rows": int(battery.input_ids.shape[0]),
            "length": int(battery.input_ids.shape[1]),
            "needle": battery.meta["needle"],
            "seed": 1,
        },
        "conditions": out,
        "random_mean_accuracy": round(statistics.mean(randoms), 4),
    }


# -- (c) steering -------------------------------------------------------------------------------------------
def sentiment(texts) -> dict:
    pos = [sum(w in POSITIVE for w in words(t)) for t in texts]
    neg = [sum(w in NEGATIVE for w in words(t)) for t in texts]
    return {
        "score": round(statistics.mean(p - n for p, n in zip(pos, neg)), 3),
        "positive_words": sum(pos),
        "negative_words": sum(neg),
        "examples": texts[:2],
    }


def steering(model, prompts, n_new: int) -> dict:
    site = f"L{STEER_LAYER}.resid.post"
    vector = steering_vector(model, [p for p, _ in PAIRS], [n for _, n in PAIRS], STEER_LAYER)
    random = torch.randn(vector.shape, generator=torch.Generator().manual_seed(0))
    random = random * vector.norm() / random.norm()
    stream = model.run(prompts[0], capture=[site], stop_after=STEER_LAYER)[site][0].float()
    out = {"unedited": sentiment(continuations(model, prompts, None, n_new))}
    log(f"(c) unedited score {out['unedited']['score']}")
    for alpha in ALPHAS:
        for name, v in (("steer", vector), ("random", random)):
            texts = continuations(model, prompts, Add(site, v, alpha=alpha), n_new)
            out[f"{name}_alpha{alpha:g}"] = sentiment(texts)
            log(f"(c) {name} alpha {alpha:g}: score {out[f'{name}_alpha{alpha:g}']['score']}")
    return {
        "site": site,
        "pairs": len(PAIRS),
        "vector_norm": round(float(vector.norm()), 3),
        "stream_norm_median": round(float(stream.norm(dim=-1).median()), 3),
        "alphas": list(ALPHAS),
        "conditions": out,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,b,c")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = lmatlas.load()
    prompts = PROMPTS[: args.prompts]
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(
        {
            "benchmark": "edit_demos",
            "model": model.provenance.source,
            "threads": 1,
            "prompts": len(prompts),
            "new_tokens": args.new_tokens,
            "decoding": "greedy, chat template",
        }
    )
    parts = {
        "a": ("children_neuron", lambda: children_neuron(model, prompts, args.new_tokens)),
        "b": ("retrieval_heads", lambda: retrieval_heads(model)),
        "c": ("steering", lambda: steering(model, prompts, args.new_tokens)),
    }
    for key in args.only.split(","):
        name, fn = parts[key.strip()]
        started = time.perf_counter()
        report[name] = fn()
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
        report[name]["load_average"] = os.getloadavg()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")  # after each part: a partial run keeps its results
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
