"""Executable explanations (rules) for neurons, features and heads, scored on held-out
text against nulls; a unit whose best rule does not beat its null is "unlabelled".

* :mod:`~lmatlas.labels.keys`, :mod:`~lmatlas.labels.rules`, :mod:`~lmatlas.labels.inputs`:
  the input side of any unit with an activation per position (neurons, features);
* :mod:`~lmatlas.labels.outputs`: a neuron's promoted tokens, verified by steering;
* :mod:`~lmatlas.labels.heads`: attention rules for heads;
* :mod:`~lmatlas.labels.scores`: AUROC, balanced accuracy, simulation score, window bootstrap;
* :mod:`~lmatlas.labels.split`: the fit / held-out split of the corpus windows;
* :mod:`~lmatlas.labels.sentences`: one sentence per label;
* :mod:`~lmatlas.labels.capture`: everything above computed from one pass over the corpus.
"""
