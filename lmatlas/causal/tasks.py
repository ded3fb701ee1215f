"""Clean / corrupt prompt pairs with answer tokens, generated from tables with a seed (``--task NAME``).

================  =====================================================================================
task              clean prompt -> answer (wrong answer), corrupt prompt
================  =====================================================================================
``ioi``           "When Mary and John went to the store, John gave a drink to" -> " Mary" (" John");
                  corrupt: the second mention of John is a third name (nobody to leave out)
``capitals``      "The capital of France is" -> " Paris" (" Rome"); corrupt: "The capital of Italy is"
``induction``     random tokens of the model's own vocabulary, repeated: the last token is predicted
                  from the first copy (a random other token as wrong); corrupt: fresh random tokens
                  that repeat nothing (the previous-token information differs too)
``greater-than``  "The war lasted from the year 1732 to the year 17" -> "4" ("2", a decade before);
                  corrupt: the start year 1701 (digit tokenizers: the next token is the tens digit)
``FILE.jsonl``    your own rows: ``{"clean": ..., "corrupt": ..., "answer": ..., "wrong": ...}``
================  =====================================================================================

Every answer must be one token of the model's tokenizer and every clean prompt must
tokenize to as many tokens as its corrupt prompt; table rows that do not are left out
(generated tasks) or are errors naming the row (your file).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmatlas.errors import TaskError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

NAMES = [
    "Mary",
    "John",
    "Tom",
    "James",
    "Anna",
    "Sarah",
    "David",
    "Paul",
    "Mark",
    "Lisa",
    "Kate",
    "Peter",
    "Emma",
    "Jack",
    "Alice",
    "Bob",
    "Laura",
    "Mike",
    "Susan",
    "George",
]
PLACES = ["store", "park", "school", "beach", "office", "garden", "station", "market"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key", "cake", "phone"]
CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Canada": "Ottawa",
    "China": "Beijing",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Cuba": "Havana",
    "Portugal": "Lisbon",
    "Hungary": "Budapest",
}
TASKS = ("ioi", "capitals", "induction", "greater-than")


@dataclass
class TaskBatch:
    """Token ids of a task: ``clean``/``corrupt`` ``[n, pos]``, ``answer``/``wrong`` ``[n]``."""

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor

    def __len__(self) -> int:
        return self.clean.shape[0]


def _single(model: "Model", text: str) -> int | None:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _encode(model: "Model", text: str) -> list[int]:
    return model.tokenizer(text)["input_ids"]


def _batch(model: "Model", name: str, rows: list[tuple[str, str, str, str]], n: int, strict: bool) -> TaskBatch:
    clean, corrupt, answer, wrong = [], [], [], []
    for i, (c, x, a, w) in enumerate(rows):
        a_id, w_id = _single(model, a), _single(model, w)
        c_ids, x_ids = _encode(model, c), _encode(model, x)
        problem = None
        if a_id is None or w_id is None:
            bad = a if a_id is None else w
            pieces = model.tokenizer.convert_ids_to_tokens(model.tokenizer.encode(bad, add_special_tokens=False))
            problem = f"answer {bad!r} is not one token (it splits into {pieces})"
        elif len(c_ids) != len(x_ids):
            problem = (
                f"clean and corrupt prompts tokenize to {len(c_ids)} and {len(x_ids)} tokens; "
                "they must align position by position"
            )
        if problem:
            if strict:
                raise TaskError(f"Row {i + 1} of task {name}: {problem}.")
            continue
        if clean and len(c_ids) != len(clean[0]):
            if strict:
                raise TaskError(
                    f"Row {i + 1} of task {name} has {len(c_ids)} tokens, the first row "
                    f"{len(clean[0])}: give rows of one length (or split the file by length)."
                )
            continue
        clean.append(c_ids), corrupt.append(x_ids), answer.append(a_id), wrong.append(w_id)
        if len(clean) == n:
            break
    if not clean:
        raise TaskError(f"Task {name} has no usable row for this tokenizer.")
    return TaskBatch(name, torch.tensor(clean), torch.tensor(corrupt), torch.tensor(answer), torch.tensor(wrong))


def _ioi(rng: random.Random) -> tuple[str, str, str, str]:
    a, b, c = rng.sample(NAMES, 3)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    template = "When {a} and {b} went to the {place}, {s} gave a {obj} to"
    return (
        template.format(a=a, b=b, place=place, s=b, obj=obj),
        template.format(a=a, b=b, place=place, s=c, obj=obj),
        f" {a}",
        f" {b}",
    )


def _capitals(rng: random.Random) -> tuple[str, str, str, str]:
    x, y = rng.sample(sorted(CAPITALS), 2)
    return f"The capital of {x} is", f"The capital of {y} is", f" {CAPITALS[x]}", f" {CAPITALS[y]}"


def _greater_than(rng: random.Random) -> tuple[str, str, str, str]:
    tens = rng.randint(2, 7)
    year = 1700 + tens * 10 + rng.randint(1, 9)
    template = "The war lasted from the year {y} to the year 17"
    return template.format(y=year), template.format(y=1701), str(tens + 1), str(tens - 1)


def _induction(model: "Model", n: int, length: int, seed: int) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    special = set(model.tokenizer.all_special_ids or ())
    pool = torch.tensor([t for t in range(min(model.layout.d_vocab, 20000)) if t not in special])
    first = pool[torch.randint(0, len(pool), (n, length), generator=generator)]
    other = pool[torch.randint(0, len(pool), (n, 2 * length), generator=generator)]
    bos = model.tokenizer.bos_token_id
    prefix = torch.full((n, 1), bos) if bos is not None else torch.empty(n, 0, dtype=torch.long)
    clean = torch.cat([prefix, first, first[:, :-1]], 1)
    corrupt = torch.cat([prefix, other[:, :-1]], 1)  # no repeat anywhere: nothing to copy from
    wrong = pool[torch.randint(0, len(pool), (n,), generator=generator)]
    return TaskBatch("induction", clean, corrupt, first[:, -1].clone(), wrong)


def load_task(model: "Model", name: str, n: int = 16, seed: int = 0) -> TaskBatch:
    """A task by name (``ioi``, ``capitals``, ``induction``, ``greater-than``) or a ``.jsonl`` path."""
    if name.endswith(".jsonl"):
        return _from_file(model, Path(name))
    rng = random.Random(seed)
    makers = {"ioi": _ioi, "capitals": _capitals, "greater-than": _greater_than}
    if name == "induction":
        return _induction(model, n, 12, seed)
    if name not in makers:
        raise TaskError(
            f"Unknown task {name!r}: use one of {', '.join(TASKS)} or a .jsonl file of "
            '{"clean", "corrupt", "answer", "wrong"} rows.'
        )
    rows = [makers[name](rng) for _ in range(n * 8)]
    return _batch(model, name, rows, n, strict=False)


def _from_file(model: "Model", path: Path) -> TaskBatch:
    if not path.is_file():
        raise TaskError(f"Task file {path} does not exist.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((row["clean"], row["corrupt"], row["answer"], row["wrong"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise TaskError(
                f"Line {number} of {path} is not a JSON object with clean, corrupt, answer and wrong "
                f"({type(error).__name__}: {error})."
            ) from None
    if not rows:
        raise TaskError(f"Task file {path} is empty: one JSON object per line.")
    return _batch(model, path.stem, rows, len(rows), strict=True)
