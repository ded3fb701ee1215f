"""Successor heads: heads that map an ordinal token to the next one (``Monday -> Tuesday``, ``3 -> 4``).

Gould et al. (2023, "Successor Heads: Recurring, Interpretable Attention Heads In The
Wild") found such heads in mid layers of many models, identified from the head's OV
circuit applied to "effective" token embeddings. This detector scores every head on
two components, each a hit rate over the same ``(token, target)`` pairs, and averages
them (``ov_weight`` = 0.5 by default):

**OV circuit (weights).** For an input token ``a``:

1. ``x = effective embedding of a``, ``[d_model]``. With ``embedding="mlp0"`` (the
   default, the paper's choice) it is the residual stream leaving block 0 when ``a`` is
   run alone with block 0's attention removed: the embedding module's output (with the
   family's own scale, e.g. Gemma's ``sqrt(d_model)``) plus the first MLP's write,
   because the first MLP acts as part of the embedding in many models (GPT-2's position-0
   embedding is included, as block 0 sees it). With ``embedding="embed"`` it is the
   embedding module's output only.
2. ``v = attn_norm(x) @ W_V(l)[kv(h)] + b_V`` (the layer's own pre-attention norm module),
   ``out = v @ W_O(l)[h]``, times the gain of a post-attention norm if the family has one.
3. ``logits = out @ R`` with ``R = readout_matrix(model, candidates)``: the final norm with
   its per-position scale dropped (gain, and centring for LayerNorm) and ``W_U``. Biases
   that do not depend on the input (``b_O``, LayerNorm bias, ``b_U``) are left out.

A pair is a **hit** when the target ranks first among the *candidates*: the tokens of
the same ordinal sequence (a restricted vocabulary, as in the paper), not the full vocabulary.

**Behaviour (activations).** The battery's prompts are runs of an ordinal sequence,
comma-separated as the model saw them in training (``" Monday, Tuesday, Wednesday,"``:
without separators SmolLM2 does not continue weekday lists). At the ``","`` after an
item ``a`` the next token is ``succ(a)``. The head scores a hit there when (i) its top-1
attention lands on ``a`` (it reads the item, rather than amplifying a prediction already
in the ``","``'s residual stream: SmolLM2's L29.H1 does the latter) and (ii) its direct
logit attribution ``attn.out[p, h] @ R`` ranks ``succ(a)`` first among the candidates
(the final norm's positive per-position factor does not change a ranking).

**Null battery.** The same sequences with the items in random order, and targets from a
random pairing ``pi(a) not in {a, succ(a)}``, fixed per example. A successor head scores
near 0 there, a head unrelated to ordinals near ``1 / n_candidates`` on both batteries.

Per-example score ``= ov_weight * OV hit rate + (1 - ov_weight) * behaviour hit rate`` over
the example's counted positions, in ``[0, 1]``; both are also reported as subscores
(``"ov"``, ``"behaviour"``) and ``meta["sequences"]`` says which sequence each example
used. Label: score >= 0.5 and z >= 3. :func:`successor_ov_scores` gives the OV
component alone over *all* pairs of every sequence.

On SmolLM2-135M-Instruct no head passes: its best, L23.H3, is a *digit* successor head
(OV hit rate 0.56 on digits, it attends to the digit before the comma) and near chance
on words; the model's own succession on these prompts comes from elsewhere.

"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from lmatlas.census import batteries
from lmatlas.census.ordinals import OrdinalTokens, ordinal_tokens, single_token
from lmatlas.census.readout import LastResult, readout_matrix, run_body  # noqa: F401 (re-exported)
from lmatlas.census.registry import Battery, Detector, register
from lmatlas.decode.heads import post_norm_gain
from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

EMBEDDINGS = ("embed", "mlp0")


def effective_embedding(model: "Model", token_ids: torch.Tensor, embedding: str = "mlp0") -> torch.Tensor:
    """``[n, d_model]`` float32 effective embeddings of ``token_ids`` (see the module docstring)."""
    if embedding not in EMBEDDINGS:
        raise LmatlasError(f"Unknown embedding {embedding!r}: use one of {', '.join(EMBEDDINGS)}.")
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device)
    if embedding == "embed":
        with torch.no_grad():
            return model.module("embed")(ids).float()
    store = run_body(
        model,
        ids[:, None],
        replace={"L0.attn.out": lambda v, s: torch.zeros_like(v)},
        capture=["L0.resid.post"],
        stop_after=0,
    )
    return store["L0.resid.post"][:, 0].float()


def ov_logits(model: "Model", x: torch.Tensor, readout: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """``[layer, head, n, n_out]``: every head's OV circuit from ``x`` ``[n, d_model]`` to ``readout``'s logits."""
    spec, lay, W = model.spec, model.layout, model.W
    layers = list(range(lay.n_layers)) if layers is None else layers
    out = []
    with torch.no_grad():
        for layer in layers:
            xn = x.to(model.dtype)
            if spec.attn_norm:
                xn = model.module("attn_norm", layer)(xn)
            v = torch.einsum("nm,kmd->knd", xn.float(), W.W_V(layer).float())  # [kv_head, n, d_head]
            if W.b_V(layer) is not None:
                v = v + W.b_V(layer).float()[:, None]
            kv = torch.tensor([lay.kv_head(h) for h in range(lay.n_heads)], device=v.device)
            heads = torch.einsum("hnd,hdm->hnm", v[kv], W.W_O(layer).float())  # [head, n, d_model]
            post_gain = post_norm_gain(model, layer)
            if post_gain is not None:
                heads = heads * post_gain.to(heads.device)
            out.append(heads @ readout)
    return torch.stack(out)


def successor_ov_scores(
    model: "Model", embedding: str = "mlp0", sequences: dict[str, OrdinalTokens] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OV component alone over every successor pair: ``([layer, head], {sequence: [layer, head]})`` hit rates."""
    sequences = sequences or ordinal_tokens(model.tokenizer)
    per_seq, total, count = {}, None, 0
    for name, seq in sequences.items():
        pairs = seq.pairs()
        cand = list(seq.ids)
        logits = ov_logits(
            model, effective_embedding(model, [a for a, _ in pairs], embedding), readout_matrix(model, cand)
        )
        target = torch.tensor([cand.index(b) for _, b in pairs], device=logits.device)
        hits = (logits.argmax(-1) == target).float()  # [layer, head, n_pairs]
        per_seq[name] = hits.mean(-1)
        total = hits.sum(-1) if total is None else total + hits.sum(-1)
        count += len(pairs)
    return total / count, per_seq


# -- battery -------------------------------------------------------------------------------------
def _walks(seq: OrdinalTokens, length: int) -> list[list[int]]:
    """Every run of ``length`` kept items where each is the successor of the one before (indices into ids)."""
    runs = []
    for start in range(len(seq.ids)):
        walk = [start]
        while len(walk) < length and (nxt := seq.successor_index(walk[-1])) is not None:
            walk.append(nxt)
        if len(walk) == length:
            runs.append(walk)
    return runs


@register
class SuccessorDetector(Detector):
    name = "successor"
    description = "maps an ordinal token to its successor (Monday->Tuesday, 3->4): OV circuit and logit attribution"
    threshold = 0.5
    min_z = 3.0

    def __init__(self, n_examples: int = 48, n_items: int = 6, embedding: str = "mlp0", ov_weight: float = 0.5):
        self.n_examples, self.n_items, self.embedding, self.ov_weight = n_examples, n_items, embedding, ov_weight
        self._last = LastResult()

    def battery(self, model: "Model", seed: int, null: bool = False) -> Battery:
        sequences = ordinal_tokens(model.tokenizer)
        runs = {name: _walks(seq, self.n_items) for name, seq in sequences.items()}
        names = [name for name in sequences if runs[name]]
        if not names:
            raise LmatlasError(f"No ordinal sequence has {self.n_items} successive single tokens: lower n_items.")
        sep = single_token(model.tokenizer, ",")
        if sep is None:
            raise LmatlasError(
                "The successor battery separates items with ',', which is not one token for this tokenizer."
            )
        name = f"{self.name}/null" if null else self.name
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}:{int(seed)}".encode()))
        prefix = batteries.prefix_ids(model)
        width = max(len(sequences[n].ids) for n in names)
        ids = torch.full((self.n_examples, len(prefix) + 2 * self.n_items), sep, dtype=torch.long)
        targets = torch.full_like(ids, -1)
        sources = torch.full_like(ids, -1)  # the item whose successor is the target
        source_pos = torch.full_like(ids, -1)  # where that item is
        candidates = torch.full((self.n_examples, width), -1, dtype=torch.long)
        chosen = []
        items_at = torch.arange(self.n_items) * 2 + len(prefix)  # item positions; each is followed by ','
        for i in range(self.n_examples):
            seq = sequences[names[i % len(names)]]
            chosen.append(seq.name)
            cand = torch.tensor(seq.ids)
            candidates[i, : len(cand)] = cand
            if null:
                items = torch.randperm(len(cand), generator=gen)[: self.n_items].tolist()
                succ = seq.successor_of()
                pairing = {}
                for a in seq.ids:  # a random partner that is neither a nor its successor
                    options = [b for b in seq.ids if b != a and b != succ.get(a)]
                    pairing[a] = options[int(torch.randint(len(options), (1,), generator=gen))]
                row = [seq.ids[k] for k in items]
                tgt = [pairing[a] for a in row]
            else:
                walk = runs[seq.name][int(torch.randint(len(runs[seq.name]), (1,), generator=gen))]
                row = [seq.ids[k] for k in walk]
                nxt = [seq.successor_index(k) for k in walk]
                tgt = [-1 if k is None else seq.ids[k] for k in nxt]
            ids[i, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            ids[i, items_at] = torch.tensor(row)
            targets[i, items_at + 1] = torch.tensor(tgt)  # at the ',' after an item, the next token is the target
            counted = targets[i, items_at + 1] >= 0
            sources[i, items_at + 1] = torch.where(counted, torch.tensor(row), -1)
            source_pos[i, items_at + 1] = torch.where(counted, items_at, -1)
        meta = {
            "kind": name,
            "null": null,
            "prefix": len(prefix),
            "targets": targets,
            "sources": sources,
            "source_pos": source_pos,
            "candidates": candidates,
            "sequences": chosen,
        }
        return Battery(name, ids.to(model.device), seed, meta)

    def score(self, model: "Model", battery: Battery) -> torch.Tensor:
        parts = self.subscores(model, battery)
        return self.ov_weight * parts["ov"] + (1 - self.ov_weight) * parts["behaviour"]

    def subscores(self, model: "Model", battery: Battery) -> dict[str, torch.Tensor]:
        """``{"ov", "behaviour"}``: each ``[n_examples, layer, head]`` hit rates over the counted positions."""

        def compute():
            ov, behaviour, counted = self.components(model, battery)
            n = counted.sum(-1).clamp_min(1)[:, None, None].float()
            return {"ov": ov.sum(1) / n, "behaviour": behaviour.sum(1) / n}

        return self._last.get(model, battery, compute)

    def components(self, model: "Model", battery: Battery) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ov_hits, behaviour_hits, counted)``: ``[n_examples, pos, layer, head]`` 0/1 floats and ``[n, pos]``."""
        ids, targets, cands = (
            battery.input_ids.to(model.device),
            battery.meta["targets"].to(model.device),
            battery.meta["candidates"].to(model.device),
        )
        vocab = torch.unique(cands[cands >= 0])  # the union of all candidates, sorted
        readout = readout_matrix(model, vocab)  # [d_model, U]
        allowed = (cands[:, :, None] == vocab[None, None, :]).any(1)  # [n, U]
        counted = targets >= 0
        target_col = torch.searchsorted(vocab, targets.clamp_min(0))  # [n, pos] column of each target
        lay = model.layout

        # OV hits: one OV evaluation per distinct source token (the item whose successor is asked).
        sources = battery.meta["sources"].to(model.device)
        inputs = torch.unique(sources[counted])
        logits = ov_logits(model, effective_embedding(model, inputs, self.embedding), readout)  # [L, H, k, U]
        row = torch.searchsorted(inputs, sources.clamp(0, int(inputs.max())))  # [n, pos]
        per_pos = logits[:, :, row].permute(2, 3, 0, 1, 4)  # [n, pos, L, H, U]
        ov = self._hits(per_pos, allowed, target_col)

        # Behaviour hits: top-1 attention on the source item and its direct logit attribution ranks the
        # target first; reduced layer by layer inside one forward.
        behaviour = torch.zeros(ids.shape[0], ids.shape[1], lay.n_layers, lay.n_heads, device=model.device)
        source_pos = battery.meta["source_pos"].to(model.device)  # [n, pos]
        on_source: dict[int, torch.Tensor] = {}

        def attends(pattern, site):  # pattern: [n, head, pos, key_pos]
            on_source[site.layer] = (pattern.argmax(-1) == source_pos[:, None]).transpose(1, 2)  # [n, pos, head]
            return None

        def reduce(out, site):  # out: [n, pos, head, d_model]
            dla = out.float() @ readout  # [n, pos, head, U]
            behaviour[:, :, site.layer] = self._hits(dla, allowed, target_col) * on_source.pop(site.layer)
            return None

        run_body(model, ids, replace={"attn.pattern": attends, "attn.out": reduce})
        mask = counted[:, :, None, None].float()
        return ov * mask, behaviour * mask, counted

    @staticmethod
    def _hits(logits: torch.Tensor, allowed: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
        """1.0 where the target ranks first among the example's candidates. ``logits``: ``[n, pos, ..., U]``."""
        extra = logits.dim() - 3
        shape = (allowed.shape[0], 1) + (1,) * extra + (allowed.shape[1],)
        masked = logits.masked_fill(~allowed.view(shape), float("-inf"))
        return (masked.argmax(-1) == target_col.view(*target_col.shape, *(1,) * extra)).float()
