"""Seeded prompt generators shared by the head detectors.

A battery is ``[n_examples, pos]`` token ids, identical for identical
``(model vocabulary, seed, kind)``: every generator draws from its own
``torch.Generator`` seeded from ``crc32("<kind>:<seed>")``, so batteries are
reproducible across runs and machines, and two detectors asking for the same kind
with the same seed get the same tokens (which lets :mod:`lmatlas.census.measure`
share one forward between them).

Token ids come from :func:`ordinary_tokens`: the ids the tokenizer knows, minus its
special and added tokens (``<|im_start|>``, ``<unused17>``, ...). A sequence starts
with the tokenizer's BOS token when it has one (``prefix = 1``), as the model saw in
training; otherwise with the first random token (``prefix = 0``).

=============  ==================================================================  ================================
kind           tokens (``pos = prefix + 2 * half``)                                used by
=============  ==================================================================  ================================
``random``     ``2 * half`` distinct random ordinary tokens                        previous_token, attention_sink,
                                                                                   local
``null``       the same, from an independent stream                                the null battery of all of them
                                                                                   and of duplicate_token, induction,
                                                                                   dormant
``repeated``   ``half`` distinct random tokens, then the same ``half`` again       duplicate_token, induction
``text``       ordinary English sentences (:data:`TEXT`) in seeded random order    dormant
``text/null``  the same rows with their tokens shuffled                            (for detectors that need it)
=============  ==================================================================  ================================

``meta`` of every battery: ``kind``, ``null`` (bool), ``prefix``, and for the random
kinds ``half`` and ``compare`` (``[n_examples, N_COMPARE]`` ordinary tokens that do
not occur in the row: the reference tokens of a copying test), plus ``measure``, the
names of what :func:`lmatlas.census.measure.readout` should compute for *every*
detector that uses this kind (so that the first detector's forward serves the rest).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from lmatlas.census.registry import Battery
from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

N_EXAMPLES = 16  #: rows per battery
HALF = 64  #: length of the repeated half; random batteries have the same length (prefix + 2 * HALF)
N_COMPARE = 63  #: reference tokens per row for copying ranks
MIN_HALF = 12  #: the shortest half the detectors accept (local needs queries beyond 2 * WINDOW)

#: Ordinary text for behaviours defined "on ordinary text". Written for lmatlas; plain facts and narration.
TEXT: tuple[str, ...] = (
    "The river rises in the hills to the north and reaches the sea after a journey of about two hundred miles.",
    "Most of the town was built in the last century, when the railway brought new trade to the valley.",
    "She opened the window, listened to the rain for a while, and then went back to her letters.",
    "A small bakery on the corner sells fresh bread every morning before the shops open.",
    "Water boils at a lower temperature on a high mountain because the air pressure is lower there.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "He had never seen so many birds gathered in one field, all facing the same direction.",
    "To make the sauce, melt the butter slowly, add the flour, and stir until the mixture is smooth.",
    "The library keeps old maps of the region in a cool room on the second floor.",
    "Children in the village walk to school along a path that follows the edge of the forest.",
    "Light from the nearest star takes a little over four years to reach the Earth.",
    "The old bridge was closed for repairs, so the bus took the longer road around the lake.",
    "Every autumn the farmers bring their apples to the market in the square.",
    "The museum's new exhibition shows tools and pottery found near the ancient harbour.",
    "When the power failed, the whole street went dark and people came out to look at the stars.",
    "Good soil holds water well but still lets the roots of the plants breathe.",
    "The train was late again, and the passengers waited on the cold platform with their bags.",
    "In the evening the fishermen repaired their nets and talked about the weather.",
    "The doctor asked him to rest for a week and to drink plenty of water.",
    "Our neighbours planted a row of young trees along the fence last spring.",
    "A good map shows not only the roads but also the rivers, the hills and the forests.",
    "The students read the first chapter of the book and wrote a short summary of it.",
    "Snow fell all night, and by morning the roads were covered and the schools were closed.",
    "The company opened a second factory near the port to ship its goods more quickly.",
    "He wrote the numbers in a small notebook that he always carried in his coat pocket.",
    "The hikers reached the top of the hill just as the sun was setting behind the mountains.",
    "Bees carry pollen from flower to flower, which helps many plants to produce fruit.",
    "The teacher explained the rule twice and then asked the class to try a few examples.",
    "After the storm, the beach was covered with seaweed, shells and pieces of wood.",
    "The city council voted to build a new park where the old warehouses used to stand.",
    "My grandmother kept a garden full of herbs, beans and tall yellow flowers.",
    "The ship left the harbour at dawn and sailed south along the coast.",
)


def _generator(kind: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{kind}:{int(seed)}".encode()))


def ordinary_tokens(model: "Model") -> torch.Tensor:
    """``[n]`` int64 ids the model can embed that are not special or added tokens, ascending."""
    size = model.layout.d_vocab
    tokenizer = model.tokenizer
    excluded: set[int] = set()
    if tokenizer is not None:
        size = min(size, len(tokenizer))
        excluded.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        excluded.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    keep = torch.ones(size, dtype=torch.bool)
    drop = [i for i in excluded if 0 <= i < size]
    if drop:
        keep[torch.tensor(drop)] = False
    return keep.nonzero().flatten()


def prefix_ids(model: "Model") -> list[int]:
    """``[bos]`` when the tokenizer has a BOS token, else ``[]``."""
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    return [] if bos is None or bos >= model.layout.d_vocab else [int(bos)]


def context_length(model: "Model") -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings`` or ``n_positions``), if known."""
    config = model.hf.config
    if model.spec.text_config:
        config = getattr(config, model.spec.text_config, config)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return None


def fit_half(model: "Model", half: int = HALF) -> int:
    """``half`` shrunk to what the model's context and vocabulary allow; an error when too little is left."""
    pool = len(ordinary_tokens(model))
    prefix = len(prefix_ids(model))
    context = context_length(model)
    limits = [half, (pool - N_COMPARE) // 2]
    if context is not None:
        limits.append((context - prefix) // 2)
    fitted = min(limits)
    if fitted < MIN_HALF:
        raise LmatlasError(
            f"This model is too small for the census batteries: {pool} ordinary tokens and a context of "
            f"{context} positions leave sequences of {fitted} distinct tokens, and the detectors need at least "
            f"{MIN_HALF} (plus {N_COMPARE} reference tokens). Use a model with a larger vocabulary or context."
        )
    return fitted


def distinct_tokens(pool: torch.Tensor, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, k]`` rows of ``k`` distinct ids drawn uniformly from ``pool`` (without replacement within a row)."""
    keys = torch.rand(n, len(pool), generator=generator)
    return pool[keys.topk(k, dim=1).indices]


def _with_prefix(model: "Model", body: torch.Tensor) -> torch.Tensor:
    prefix = prefix_ids(model)
    if not prefix:
        return body
    return torch.cat([torch.tensor(prefix).expand(body.shape[0], len(prefix)), body], dim=1)


def _battery(model, name, seed, ids, meta) -> Battery:
    return Battery(name=name, input_ids=ids.to(model.device), seed=int(seed), meta=meta)


def random_battery(
    model: "Model", name: str, seed: int, *, null: bool = False, n: int = N_EXAMPLES, half: int = HALF
) -> Battery:
    """``[n, prefix + 2 * half]`` distinct random ordinary tokens (kind ``random``, or ``null`` when ``null``).

    ``meta["compare"]`` holds ``N_COMPARE`` more distinct tokens per row, absent from the row.
    The null stream also declares the copying, norm and copy-suppression measurements (the
    induction, dormant and copy_suppression detectors' nulls use them), so one forward serves every null.
    """
    half = fit_half(model, half)
    kind = "null" if null else "random"
    drawn = distinct_tokens(ordinary_tokens(model), n, 2 * half + N_COMPARE, _generator(kind, seed))
    meta = {
        "kind": kind,
        "null": null,
        "prefix": len(prefix_ids(model)),
        "half": half,
        "compare": drawn[:, 2 * half :].to(model.device),
        "measure": ("copy", "norms", "suppression") if null else (),
    }
    return _battery(model, f"{name}/null" if null else name, seed, _with_prefix(model, drawn[:, : 2 * half]), meta)


def repeated_battery(model: "Model", name: str, seed: int, *, n: int = N_EXAMPLES, half: int = HALF) -> Battery:
    """``[n, prefix + 2 * half]``: ``half`` distinct random tokens, then the same tokens again (kind ``repeated``).

    At a query ``q`` in the second half (``q >= prefix + half``) the same token sat at
    ``q - half`` (the duplicate) and was followed by the token at ``q - half + 1``
    (what an induction head attends to and copies: the token at ``q + 1``).
    """
    half = fit_half(model, half)
    drawn = distinct_tokens(ordinary_tokens(model), n, half + N_COMPARE, _generator("repeated", seed))
    body = torch.cat([drawn[:, :half], drawn[:, :half]], dim=1)
    meta = {
        "kind": "repeated",
        "null": False,
        "prefix": len(prefix_ids(model)),
        "half": half,
        "compare": drawn[:, half:].to(model.device),
        "measure": ("copy", "suppression"),
    }
    return _battery(model, name, seed, _with_prefix(model, body), meta)


def text_battery(
    model: "Model", name: str, seed: int, *, null: bool = False, n: int = N_EXAMPLES, length: int = 2 * HALF
) -> Battery:
    """``[n, prefix + length]`` rows of :data:`TEXT` sentences in seeded random order (kind ``text``).

    With ``null`` (kind ``text/null``) each row's tokens after the prefix are shuffled:
    the same tokens, no longer ordinary text. ``meta["measure"]`` asks for head output norms.
    """
    if model.tokenizer is None:
        raise LmatlasError("The text battery needs the model's tokenizer: load the model with one.")
    context = context_length(model)
    prefix = prefix_ids(model)
    if context is not None:
        length = min(length, context - len(prefix))
    generator = _generator("text", seed)
    sentences = [model.tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in TEXT]
    rows = []
    for _ in range(n):
        row: list[int] = []
        while len(row) < length:
            for index in torch.randperm(len(sentences), generator=generator).tolist():
                row.extend(sentences[index])
        rows.append(row[:length])
    body = torch.tensor(rows, dtype=torch.long)
    if null:
        shuffle = torch.rand(body.shape, generator=_generator("text/null", seed)).argsort(dim=1)
        body = body.gather(1, shuffle)
    meta = {"kind": "text/null" if null else "text", "null": null, "prefix": len(prefix), "measure": ("norms",)}
    return _battery(model, f"{name}/null" if null else name, seed, _with_prefix(model, body), meta)
