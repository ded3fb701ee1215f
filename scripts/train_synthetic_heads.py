"""Train a tiny two-layer Llama in which a previous-token head and an induction head form; save it as a fixture.

Why these heads form. Every training sequence holds a block of random tokens ``A``
followed immediately by a second copy of it::

    <bos>  noise (n tokens)  a1 a2 ... aL  a1 a2 ... aL  filler

and the loss is only on the second copy: at ``aj`` predict ``a(j+1)``. The tokens are
random, so the only way to predict is to *find the earlier occurrence* of the
current token and *copy the token that followed it*. One attention layer cannot do
that: a query can look for keys by their own token, but "the token after my earlier
occurrence" is a key whose *previous* token matches the query. Two layers can
(Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et
al. 2022, "In-context Learning and Induction Heads"):

* a **previous-token head** in layer 0 attends from every position to the one before
  it and writes that token into the residual stream;
* an **induction head** in layer 1 matches its query (the current token ``aj``)
  against keys that carry, thanks to the previous-token head, *their previous token*
  (K-composition). The key that matches is the position right after the earlier
  ``aj``, i.e. ``a(j+1)`` in the first copy, and the head's OV circuit copies that
  token to the output.

Lengths ``L`` (6 to 20) and the noise prefix ``n`` are random per sequence, so no
fixed positional offset ("attend L-1 back") can solve the task: the model has to
learn content-based induction. The vocabulary is 60 characters plus 4 specials; the
tokens of ``A`` are drawn without replacement, so each occurs once per copy.

Output: a Hugging Face checkpoint directory (config, safetensors weights, a
character-level tokenizer built with ``tokenizers``: ``"The cat"`` is ``<bos> T h e
␣ c a t``) and ``heads.json`` with the training setup, the copy accuracy and every
head's previous-token and induction scores, measured with lmatlas traces of the saved
model on fresh sequences (seed 1234):

* previous-token score of a head: mean attention from position ``i`` to ``i - 1``,
  over every position of the held-out batch;
* induction score of a head: mean attention from the second-copy token ``aj`` to the
  first-copy position of ``a(j+1)``, over all second-copy positions.

What forms with the defaults (seed 0, 1200 steps, one thread; the shipped fixture):
held-out copy accuracy 0.999; **L0.H1** is the previous-token head (score 0.966, every
other head <= 0.10), and all four layer-1 heads do induction (L1.H0-H3: 0.80, 0.87,
0.95, 0.93; **L1.H2** strongest; layer-0 heads <= 0.03). Several heads of one layer
sharing the job is the usual outcome with nothing else for them to do.
``tests/test_census_trained.py`` re-measures these heads, against a null battery, and
shows that zeroing L0.H1 drops copy accuracy from 1.0 to about 0.

    .venv/bin/python scripts/train_synthetic_heads.py [--out tests/fixtures/induction_model]
        [--steps 1200] [--seed 0] [--threads 1]

Takes one to four minutes on one CPU core (0.04 to 0.17 s a step, depending on how busy
the machine is); the loss drops from ~4 to under 0.1 around step 300, the
phase change where the induction circuit forms. Deterministic for a given seed,
thread count and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: The 60 content characters; their ids are 0..59 in this order. Specials follow.
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'-:"
SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
N_CONTENT = len(CHARS)
BOS = N_CONTENT
SEQ_LEN = 64
MIN_L, MAX_L = 6, 20
EVAL_SEED = 1234
LABEL_THRESHOLD = 0.5  # heads.json lists every head whose score reaches it


def char_tokenizer():
    """A character-level 🤗 fast tokenizer over :data:`CHARS` that prepends ``<bos>`` (others -> ``<unk>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(CHARS)}
    vocab.update({tok: N_CONTENT + i for i, tok in enumerate(SPECIALS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@dataclass
class Batch:
    """Repeated-sequence examples.

    Attributes:
        ids: ``[batch, SEQ_LEN]`` token ids.
        labels: ``[batch, SEQ_LEN]`` next-token labels, ``-100`` outside the second copy.
        first: ``[batch]`` position of ``a1`` in the first copy.
        length: ``[batch]`` the block length ``L``.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    first: torch.Tensor
    length: torch.Tensor


def repeated_batch(batch: int, generator: torch.Generator) -> Batch:
    """``batch`` sequences ``<bos> noise A A filler`` (see the module docstring)."""
    ids = torch.randint(0, N_CONTENT, (batch, SEQ_LEN), generator=generator)
    ids[:, 0] = BOS
    labels = torch.full_like(ids, -100)
    first = torch.empty(batch, dtype=torch.long)
    length = torch.randint(MIN_L, MAX_L + 1, (batch,), generator=generator)
    for b in range(batch):
        n_len = int(length[b])
        start = 1 + int(torch.randint(0, SEQ_LEN - 2 * n_len, (1,), generator=generator))
        block = torch.randperm(N_CONTENT, generator=generator)[:n_len]
        ids[b, start : start + n_len] = block
        ids[b, start + n_len : start + 2 * n_len] = block
        second = start + n_len
        labels[b, second : second + n_len - 1] = block[1:]  # at a_j (second copy) predict a_(j+1)
        first[b] = start
    return Batch(ids, labels, first, length)


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=N_CONTENT + len(SPECIALS),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN * 2,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=BOS + 1,
        pad_token_id=BOS + 2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model, steps: int, batch: int, lr: float, seed: int, log_every: int = 100) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    history = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        data = repeated_batch(batch, generator)
        logits = model(input_ids=data.ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), data.labels[:, :-1].flatten(), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": round(loss.item(), 4)})
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - started:.0f}s)", flush=True)
    return history


def copy_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Greedy accuracy on the labelled (second-copy) positions; ``logits [batch, pos, vocab]`` predicts ``labels``."""
    keep = labels != -100
    return float((logits.argmax(-1)[keep] == labels[keep]).float().mean())


def head_scores(patterns: torch.Tensor, data: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(previous [layer, head], induction [layer, head])`` from patterns ``[layer, batch, head, pos, key_pos]``.

    previous: mean of ``pattern[i, i-1]`` over positions ``1..pos-1``. induction:
    mean of ``pattern[s + j, f + j + 1]`` over the second copy (``f`` = first copy's
    start, ``s = f + L``, ``j = 0..L-1``): the key right after the earlier occurrence.
    """
    previous = patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))
    n_layers, batch, heads = patterns.shape[:3]
    total = torch.zeros(n_layers, heads)
    count = 0
    for b in range(batch):
        f, n_len = int(data.first[b]), int(data.length[b])
        queries = torch.arange(f + n_len, f + 2 * n_len)
        keys = queries - n_len + 1
        total += patterns[:, b, :, queries, keys].sum(-1)
        count += n_len
    return previous, total / count


def measure(model_dir: Path, n_eval: int = 256) -> dict:
    """Load the saved checkpoint with lmatlas and score every head on fresh sequences."""
    import lmatlas

    model = lmatlas.load(model_dir)
    data = repeated_batch(n_eval, torch.Generator().manual_seed(EVAL_SEED))
    cache = model.run(data.ids, capture=["attn.pattern"])
    patterns = torch.stack([cache.pattern(layer) for layer in range(model.layout.n_layers)]).float()
    previous, induction = head_scores(patterns, data)
    prev_head = int(previous[0].argmax())
    ind_head = int(induction[1].argmax())

    def above(scores: torch.Tensor) -> list[str]:
        return [f"L{layer}.H{head}" for layer, head in (scores >= LABEL_THRESHOLD).nonzero().tolist()]

    return {
        "eval_seed": EVAL_SEED,
        "eval_examples": n_eval,
        "copy_accuracy": round(copy_accuracy(cache.logits, data.labels), 4),
        "previous_token_head": {"head": f"L0.H{prev_head}", "score": round(float(previous[0, prev_head]), 4)},
        "induction_head": {"head": f"L1.H{ind_head}", "score": round(float(induction[1, ind_head]), 4)},
        "label_threshold": LABEL_THRESHOLD,
        "previous_token_heads": above(previous),
        "induction_heads": above(induction),
        "previous_token_scores": [[round(float(x), 4) for x in row] for row in previous],
        "induction_scores": [[round(float(x), 4) for x in row] for row in induction],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "induction_model")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for a model this small)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    model = build_model(args.seed)
    print(
        f"training {sum(p.numel() for p in model.parameters())} parameters for {args.steps} steps "
        f"({torch.get_num_threads()} threads)",
        flush=True,
    )
    history = train(model, args.steps, args.batch, args.lr, args.seed)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    char_tokenizer().save_pretrained(args.out)
    report = {
        "task": f"<bos> noise A A filler; |A| in [{MIN_L}, {MAX_L}], {SEQ_LEN} tokens, loss on the second copy",
        "vocab": CHARS,
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "torch_threads": torch.get_num_threads(),
        "final_loss": history[-1]["loss"],
        **measure(args.out),
    }
    (args.out / "heads.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "copy_accuracy",
                    "previous_token_head",
                    "induction_head",
                    "previous_token_heads",
                    "induction_heads",
                    "previous_token_scores",
                    "induction_scores",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
