"""The names of the decoding strategies and drafters, light enough for the CLI to import at start-up.

The tables themselves (:data:`~lmatlas.infer.decoding.strategies.STRATEGIES`,
:data:`~lmatlas.infer.decoding.drafters.DRAFTERS`) import torch; a test checks that these
names are exactly their keys.
"""

STRATEGY_NAMES = ("greedy", "dola", "decore", "speculative")
DRAFTER_NAMES = ("prompt-lookup", "early-exit", "heads")
