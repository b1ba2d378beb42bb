"""Deploying a pruned model (docs/deploy.md): compressed folders
(:mod:`.compress`), the ``d2prune_sparse`` transformers quantizer that lets
``AutoModelForCausalLM.from_pretrained`` read them (:mod:`.quantizer`), and
dense-vs-sparse inference timings (:mod:`.speed`).

Layer 3 (beside the engine, which it never needs): imports only
:mod:`d2prune.io`, :mod:`d2prune.ops` and the foundation."""
