"""Labels from one pass over the corpus: capture once, then label one layer at a time.

:func:`capture` runs the corpus windows ``[window, pos]`` through the model once (``batch``
windows per forward), keeping every layer's neuron activations ``[window, pos, d_mlp]``
(float16, to halve the memory of 30 x 1,536 neurons) and reducing every layer's attention
patterns at once to the sums each head rule needs on the fit and held-out windows
(:func:`lmatlas.labels.heads.explained_sums`): patterns are never kept.

:func:`label_layer` then labels one layer's neurons (input side, all of them; output side,
the ``steer`` best of them by simulation score) and heads, and returns the rows of the
atlas ``labels`` table (:mod:`lmatlas.atlas.stages.labels`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.labels import heads as head_rules
from lmatlas.labels import sentences
from lmatlas.labels.inputs import label_inputs
from lmatlas.labels.keys import Family, families
from lmatlas.labels.outputs import Clean, clean_run, steering
from lmatlas.labels.split import corpus_hash, fit_windows

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

LATENT_CHUNK = 4096
PROMPT_TOKENS = 32
PROMPTS = 2


@dataclass(frozen=True)
class Captured:
    """What labelling a model's layers needs, from one pass over ``windows [window, pos]``."""

    windows: torch.Tensor
    fit: torch.Tensor  # [window] bool
    acts: list[torch.Tensor]  # per layer [window, pos, d_mlp] float16
    head_fit: list[dict[str, torch.Tensor]]  # per layer: explained_sums on the fit windows
    head_held: list[dict[str, torch.Tensor]]
    families: list[Family]
    corpus_hash: str
    seed: int
    prompts: torch.Tensor  # [PROMPTS, PROMPT_TOKENS] held-out prompts for steering
    clean: Clean  # their unedited log-probabilities [PROMPTS, PROMPT_TOKENS, vocab] and block inputs
    spelled: dict[int, str] = field(default_factory=dict)  # id -> text, filled by the first unit, read by the rest


def raw_text(model: "Model"):
    """``ids -> [text]``: each token decoded alone (what format and delimiter rules read)."""
    return lambda ids: [model.tokenizer.decode([i]) for i in ids]


def capture(model: "Model", windows: torch.Tensor, seed: int = 0, batch: int = 4, upto: int | None = None) -> Captured:
    """One forward per ``batch`` windows: neuron activations kept, attention reduced to rule sums.

    ``upto``: stop after that layer (labelling one layer needs nothing later).
    """
    fit = fit_windows(windows.shape[0], seed)  # refuses a corpus too small before any compute
    text = raw_text(model)
    rules = head_rules.rule_set(windows, text)
    n_layers = model.layout.n_layers if upto is None else upto + 1
    acts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    sums: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(n_layers)]
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch]
            cache = model.run(ids, capture=["mlp.act", "attn.pattern"], lm_head=False, stop_after=upto)
            part = rules.rows(slice(start, start + batch))
            for layer in range(n_layers):
                acts[layer].append(cache.neurons(layer).to(torch.float16))
                sums[layer].append(head_rules.explained_sums(cache.pattern(layer).float(), part))
            del cache
    prompts = windows[~fit][:PROMPTS, :PROMPT_TOKENS]
    joined = [{k: torch.cat([s[k] for s in layer]) for k in layer[0]} for layer in sums]
    return Captured(
        windows=windows,
        fit=fit,
        acts=[torch.cat(a) for a in acts],
        head_fit=[{k: v[fit] for k, v in layer.items()} for layer in joined],
        head_held=[{k: v[~fit] for k, v in layer.items()} for layer in joined],
        families=families(windows, text),
        corpus_hash=corpus_hash(windows),
        seed=seed,
        prompts=prompts,
        clean=clean_run(model, prompts),
    )


def _row(unit: str, kind: str, layer: int, index: int, side: str, data: Captured, **fields: Any) -> dict[str, Any]:
    return {
        "unit": unit,
        "kind": kind,
        "layer": layer,
        "idx": index,
        "side": side,
        "labelled": bool(fields["labelled"]),
        "rule": json.dumps(fields["rule"]),
        "sentence": fields["sentence"],
        "score": _finite(fields["score"]),
        "score_lo": _finite(fields["score_lo"]),
        "score_hi": _finite(fields["score_hi"]),
        "scores": json.dumps({k: _finite(v) for k, v in fields["scores"].items()}),
        "nulls": json.dumps({k: _finite(v) for k, v in fields["nulls"].items()}),
        "n": int(fields["n"]),
        "corpus_hash": data.corpus_hash,
        "seed": data.seed,
    }


def _finite(x: float) -> float | None:
    x = float(x)
    return None if x != x else round(x, 6)


def speller(model: "Model", warm: torch.Tensor, known: dict[int, str] | None = None):
    """``ids -> [text]`` as :func:`lmatlas.decode.token_text.token_texts`, each id decoded once
    (``warm``: ids decoded up front in one batch, e.g. every corpus token; ``known``: the texts of
    an earlier speller of the same model, extended in place, so that the units of a build decode
    the corpus once: ``token_texts`` spells each id on its own, so the texts do not depend on it)."""
    from lmatlas.decode.token_text import token_texts

    known = {} if known is None else known

    def spell(ids) -> list[str]:
        try:  # every id known (the corpus tokens are decoded up front)
            return [known[i] for i in ids]
        except KeyError:
            pass
        ids = [int(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in known]
        if missing:
            known.update(zip(missing, token_texts(model.tokenizer, missing)))
        return [known[i] for i in ids]

    spell(warm.unique().tolist())
    return spell


def _input_rows(model: "Model", data: Captured, labels, name_of) -> list[dict[str, Any]]:
    """One input-side row per unit of ``labels``; ``name_of(i) -> (unit, kind, layer, index)``.

    The rows :func:`_row` writes, with every score column read and rounded once for the layer.
    """
    spell = speller(model, data.windows, data.spelled)
    names = list(labels.scores)
    raw = [labels.scores[k].tolist() for k in names]
    rounded = [[None if x != x else round(x, 6) for x in column] for column in raw]
    null_names = [k for k in names if k.startswith("null_")]
    main_names = [k for k in names if not k.startswith("null_")]
    at = {k: j for j, k in enumerate(names)}
    thresholds, labelled = labels.threshold.tolist(), labels.labelled.tolist()
    rows = []
    for n in range(len(labels.family)):
        s = {k: column[n] for k, column in zip(names, raw)}
        r = [column[n] for column in rounded]
        family, keys = labels.family[n], labels.keys[n]
        spelled = (
            keys if family == "format" else [spell(list(k)) if isinstance(k, tuple) else spell([k])[0] for k in keys]
        )
        rule = {"family": family, "keys": keys, "tokens": spelled, "weights": labels.weights[n]}
        rule["threshold"] = thresholds[n]
        text = sentences.input_sentence(sentences.input_rule(family, keys, spell), s, bool(labelled[n]))
        unit, kind, layer, index = name_of(n)
        rows.append(
            {
                "unit": unit,
                "kind": kind,
                "layer": layer,
                "idx": index,
                "side": "input",
                "labelled": bool(labelled[n]),
                "rule": json.dumps(rule),
                "sentence": text,
                "score": r[at["auroc"]],
                "score_lo": r[at["auroc_lo"]],
                "score_hi": r[at["auroc_hi"]],
                "scores": json.dumps({k: r[at[k]] for k in main_names}),
                "nulls": json.dumps({k: r[at[k]] for k in null_names}),
                "n": int(labels.n_heldout),
                "corpus_hash": data.corpus_hash,
                "seed": data.seed,
            }
        )
    return rows


def neuron_rows(
    model: "Model", data: Captured, layer: int, steer: int = 4, steer_also: int | None = None
) -> list[dict[str, Any]]:
    """Input-side rows for every neuron of ``layer``; output-side rows for the ``steer`` best (and ``steer_also``)."""
    labels = label_inputs(data.acts[layer].float(), data.families, data.fit, seed=data.seed + layer)
    rows = _input_rows(model, data, labels, lambda n: (f"L{layer}.N{n}", "neuron", layer, n))
    neurons = steered_neurons(labels, steer)
    if steer_also is not None and steer_also not in neurons:
        neurons = sorted(neurons + [steer_also])
    return rows + output_rows(model, data, layer, neurons)


def feature_rows(model: "Model", data: Captured, site: str, batch: int = 4) -> list[dict[str, Any]]:
    """Input-side rows for every latent of the dictionary at ``site`` (``"L15.resid.post.F"``): a feature
    is labelled exactly as a neuron is, from its activation at every corpus position."""
    from lmatlas.model.sites import parse_sites

    (parsed,) = parse_sites(site, model.layout)
    parts = []
    with torch.no_grad():
        for start in range(0, data.windows.shape[0], batch):
            ids = data.windows[start : start + batch]
            parts.append(model.run(ids, capture=[site], stop_after=parsed.layer, lm_head=False)[site].float())
    acts = torch.cat(parts)  # [window, pos, latent]
    rows = []
    for first in range(0, acts.shape[-1], LATENT_CHUNK):
        labels = label_inputs(
            acts[..., first : first + LATENT_CHUNK], data.families, data.fit, data.seed + parsed.layer
        )
        name_of = lambda i: (f"{site}{first + i}", "feature", parsed.layer, first + i)  # noqa: E731
        rows += _input_rows(model, data, labels, name_of)
    return rows


def steered_neurons(labels, steer: int) -> list[int]:
    """The ``steer`` neurons whose output side is checked: best held-out simulation, labelled ones first."""
    simulation = labels.scores["simulation"].nan_to_num(-1.0)
    order = (simulation + 2.0 * labels.labelled.float()).argsort(descending=True)
    return sorted(order[:steer].tolist())


def output_rows(model: "Model", data: Captured, layer: int, neurons: list[int]) -> list[dict[str, Any]]:
    """Output-side rows (steering) for ``neurons`` of ``layer``."""
    from lmatlas.decode.token_text import token_texts

    fit_acts = data.acts[layer][data.fit].float().flatten(0, 1)
    delta = fit_acts[:, neurons].max(0).values.clamp_min(0)
    rows = []
    for result in steering(model, layer, neurons, delta, data.prompts, seed=data.seed, clean=data.clean):
        texts = token_texts(model.tokenizer, result.promoted)
        s = {"steering": result.steering, "steering_lo": result.lo, "steering_hi": result.hi, "null": result.null}
        rule = {"promoted": result.promoted, "tokens": texts, "delta": result.delta}
        rows.append(
            _row(
                f"L{layer}.N{result.neuron}",
                "neuron",
                layer,
                result.neuron,
                "output",
                data,
                labelled=result.verified,
                rule=rule,
                sentence=sentences.output_sentence(texts, s, result.verified),
                score=result.steering,
                score_lo=result.lo,
                score_hi=result.hi,
                scores={"steering": result.steering, "delta": result.delta},
                nulls={"random_sets_95": result.null},
                n=result.n,
            )
        )
    return rows


def head_rows(data: Captured, layer: int) -> list[dict[str, Any]]:
    """One attention row per head of ``layer``."""
    rows = []
    for label in head_rules.label_heads(layer, data.head_fit[layer], data.head_held[layer], seed=data.seed):
        s = {
            "explained": label.explained,
            "explained_lo": label.explained_lo,
            "explained_hi": label.explained_hi,
            "null_layer": label.null_layer,
            "null_uniform": label.null_uniform,
        }
        if label.rule.startswith("near_previous"):
            s["previous"] = label.by_rule["previous"]
        rule = {"rule": label.rule, "description": sentences.describe_rule(label.rule), "by_rule": label.by_rule}
        rows.append(
            _row(
                f"L{layer}.H{label.head}",
                "head",
                layer,
                label.head,
                "attention",
                data,
                labelled=label.labelled,
                rule=rule,
                sentence=sentences.head_sentence(label.rule, s, label.labelled),
                score=label.explained,
                score_lo=label.explained_lo,
                score_hi=label.explained_hi,
                scores={"explained": label.explained},
                nulls={"layer": label.null_layer, "uniform": label.null_uniform},
                n=label.n_queries,
            )
        )
    return rows


def label_layer(
    model: "Model", data: Captured, layer: int, steer: int = 4, steer_also: int | None = None
) -> list[dict[str, Any]]:
    """Every label row of one layer: neurons (input, and output for ``steer`` of them) and heads."""
    return neuron_rows(model, data, layer, steer, steer_also) + head_rows(data, layer)
