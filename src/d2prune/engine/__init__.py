"""The one sequential engine, for every architecture (docs/method.md §1):

* :mod:`.sequential` - capture of each block's inputs and keyword arguments,
  hooks, the block loop, propagation, the model's own head;
* :mod:`.method` - the contract a pruning method implements (``Method``,
  ``LayerPruner``) and the registry the engine builds methods from;
* :mod:`.calibration` - one block's calibration pass, ``prune_layers`` with the
  per-layer error, resume points, and the contract of candidate searches;
* :mod:`.allocation` - per-block sparsity (OWL); :mod:`.distributed` - torchrun:
  sample shards, statistics combined over ranks.

Layer 3: imports :mod:`d2prune.io`, :mod:`d2prune.ops` and the foundation; it
knows no particular method (they register themselves)."""
