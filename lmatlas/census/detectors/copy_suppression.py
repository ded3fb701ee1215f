"""Copy-suppression heads: attend to a token that appeared earlier and lower that token's logit.

McDougall et al. (2023, "Copy Suppression: Comprehensively Understanding an Attention
Head") describe GPT-2 small's L10H7: when earlier layers predict a token that already
sits in the context, the head attends to that earlier occurrence and writes *against*
it (a negative copying OV circuit), calibrating over-confident copying; when there is
nothing to suppress it parks on the first token.

**Battery** (``repeated``, shared with induction, :mod:`lmatlas.census.batteries`):
``half`` distinct random tokens, then the same tokens again. At every second-half query
``q`` the next token is predictable from context (induction heads predict the token that
followed the earlier copy), so a copy-suppression head has something to suppress.

**Hit** at a second-half query ``q`` of head ``h``:

1. its top-1 attention key ``j`` is an *earlier body token*: ``prefix <= j < q``
   (not the BOS/first-token sink, not the current token itself); let ``t = ids[j]``;
2. its direct logit attribution lowers ``t``: ``dla(t) < 0``, with
   ``dla(u) = attn.out[q, h] @ R[:, u]`` and ``R`` the final norm (gain, LayerNorm
   centring; its positive per-position scale dropped) followed by ``W_U``
   (:func:`lmatlas.census.detectors.successor.readout_matrix`);
3. and lowers it *most*: ``dla(t)`` is below ``dla(c)`` for every one of the
   ``N_COMPARE`` reference tokens ``c`` of the row (``meta["compare"]``: random
   ordinary tokens absent from the row). A head that writes a general negative
   (the same for every token) fails this; one with a random OV circuit passes it with
   probability about ``1 / (N_COMPARE + 1)``.

**Score** per example: the fraction of the ``half`` second-half queries that are hits, in
``[0, 1]``. It is *unconditional* on where the head attends: a head that suppresses
whatever it reads but only reads earlier tokens when they are predicted (the paper's
mechanism) scores its attention rate times its suppression rate.

**Null** (independent ``null`` battery: distinct random tokens, nothing repeats): the same
hits at the same positions. Nothing is predictable, so a copy-suppression head parks on
the sink and scores near 0; a head that always reads an earlier token and suppresses it
(prediction or not) scores the same on both and gets a z near 0.

Label: score >= 0.2 and z >= 3. The threshold is lower than most because the mechanism
is conditional: SmolLM2-135M's clearest such head (L24.H4) attends to the predicted token
at about a third of the queries and then suppresses it almost always.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.census import batteries
from lmatlas.census.measure import readout
from lmatlas.census.readout import run_body
from lmatlas.census.registry import Battery, Detector, register
from lmatlas.census.suppression import SuppressionHits, at_queries

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def suppression_hits(
    model: "Model", ids: torch.Tensor, queries: torch.Tensor, compare: torch.Tensor, prefix: int
) -> torch.Tensor:
    """``[batch, layer, head, n_queries]`` bool: the hit test of the module docstring at ``queries``, in one forward.

    Args:
        ids: ``[batch, pos]`` token ids.
        queries: ``[n_queries]`` query positions tested.
        compare: ``[batch, n_compare]`` reference token ids per row.
        prefix: key positions below it (BOS) do not count as earlier tokens.

    Inside a census the detector reads the same test from the shared forward of its battery
    (:func:`lmatlas.census.measure.readout` with ``suppression=True``), computed by the same
    :class:`~lmatlas.census.suppression.SuppressionHits`.
    """
    test = SuppressionHits(model, ids, queries, compare, prefix)

    def top1(pattern, site):  # [batch, head, pos, key_pos]
        test.attended(pattern, site.layer)
        return None

    def reduce(out, site):  # [batch, pos, head, d_model]
        test.reduce(at_queries(out, test.queries), site.layer)
        return None

    run_body(model, ids.to(model.device), replace={"attn.pattern": top1, "attn.out": reduce})
    return test.hits


@register
class CopySuppression(Detector):
    name = "copy_suppression"
    description = "attends to an earlier token that is predicted next and lowers that token's logit most"
    threshold = 0.2
    min_z = 3.0

    def battery(self, model: "Model", seed: int, null: bool = False) -> Battery:
        if null:
            return batteries.random_battery(model, self.name, seed, null=True)
        return batteries.repeated_battery(model, self.name, seed)

    def score(self, model: "Model", battery: Battery) -> torch.Tensor:
        hits = readout(model, battery, suppression=True).suppression  # [batch, layer, head, n_queries]
        return hits.float().mean(-1)
