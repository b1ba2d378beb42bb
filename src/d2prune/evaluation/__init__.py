"""Measuring a model: perplexity by the SparseGPT / Wanda protocol
(:mod:`.perplexity`), zero-shot accuracy through lm-eval-harness
(:mod:`.zeroshot`), image classifiers' data and accuracy (:mod:`.vision`),
attention probabilities and KL (:mod:`.attention`) and the dense-vs-pruned
attention diagnostics (:mod:`.diagnostics`).

Layer 4: imports :mod:`d2prune.engine`, :mod:`d2prune.io`, :mod:`d2prune.ops`
and the foundation."""
