"""Decoding with the map: contrastive decoding (DoLa, DeCoRe) and speculative decoding.

* :mod:`~lmatlas.infer.decoding.loop` — the greedy loop every contrastive strategy shares;
* :mod:`~lmatlas.infer.decoding.dola` — DoLa as a ``custom_generate`` callable and ``generate_dola``;
* :mod:`~lmatlas.infer.decoding.decore` — DeCoRe (retrieval heads masked by an edit) and its control;
* :mod:`~lmatlas.infer.decoding.speculative` — draft-and-verify decoding, identical to greedy;
* :mod:`~lmatlas.infer.decoding.drafters` — prompt-lookup, early-exit and draft-head drafters;
* :mod:`~lmatlas.infer.decoding.draft_heads` — Medusa-1 style heads: train, save, load;
* :mod:`~lmatlas.infer.decoding.acceptance` — how often an early exit agrees with the full model;
* :mod:`~lmatlas.infer.decoding.strategies` — the strategies as values, registered once (``STRATEGIES``).
"""
