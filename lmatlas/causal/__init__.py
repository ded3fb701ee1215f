"""Why did the model say that? Metrics, tasks, exact activation patching and attribution patching.

* :mod:`lmatlas.causal.metrics` — metrics as callables on logits;
* :mod:`lmatlas.causal.tasks` — clean / corrupt tasks (ioi, capitals, induction, greater-than, your .jsonl);
* :mod:`lmatlas.causal.targets` — what is patched (heads, q/k/v, layers, neurons, positions);
* :mod:`lmatlas.causal.patching` — exact, batched patching and ablation sweeps;
* :mod:`lmatlas.causal.attribution` — AtP with the QK fix and GradDrop, verified by exact patching;
* :mod:`lmatlas.causal.effects` — the ``Effects`` table;
* :mod:`lmatlas.causal.circuits` / :mod:`lmatlas.causal.edge_scores` — edge scores (EAP, EAP-IG on inputs
  or activations, QK-aware);
* :mod:`lmatlas.causal.edges` / :mod:`lmatlas.causal.edge_run` — circuits as edge masks, run edge by edge;
* :mod:`lmatlas.causal.faithfulness` / :mod:`lmatlas.causal.edge_verify` — curves, CPR / CMD, verification;
* :mod:`lmatlas.causal.attention_sources` — a head's attention split over its query- and key-side sources.
"""

from lmatlas.causal.attention_sources import AttentionSources, attention_sources
from lmatlas.causal.attribution import attribute, verify_effects
from lmatlas.causal.edge_run import EdgeRunner
from lmatlas.causal.edge_verify import verify_edges
from lmatlas.causal.edges import EdgeIndex
from lmatlas.causal.effects import Effects, spearman
from lmatlas.causal.metrics import kl_to, log_prob, logit_diff, loss, probability
from lmatlas.causal.patching import ablate, patch
from lmatlas.causal.targets import all_heads, expand, parse_component
from lmatlas.causal.tasks import TaskBatch, load_task

__all__ = [
    "AttentionSources",
    "EdgeIndex",
    "EdgeRunner",
    "attention_sources",
    "verify_edges",
    "Effects",
    "TaskBatch",
    "ablate",
    "all_heads",
    "attribute",
    "expand",
    "kl_to",
    "load_task",
    "log_prob",
    "logit_diff",
    "loss",
    "parse_component",
    "patch",
    "probability",
    "spearman",
    "verify_effects",
]
