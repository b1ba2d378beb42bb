"""Everything that touches files, and what the engine needs to know about a
model's architecture:

* :mod:`.modeling` - loading (hub id, folder, GGUF, the default model) and the
  architecture table (decoder blocks, prunable Linears, fused q/k/v, attention);
* :mod:`.data` - C4 calibration windows, held-out windows, evaluation text;
* :mod:`.source` - where a block's weights and the activations live between
  their turns (placement on the compute device, the activation store, the
  in-memory :class:`~d2prune.io.source.BlockSource`);
* :mod:`.streaming` (+ :mod:`.gguf`) - models larger than RAM: one block read
  from safetensors / GGUF / compressed checkpoints at a time, sharded output;
  :mod:`.key_mapping` - checkpoint tensors to parameters and back by
  transformers' own rules (renamed keys, per-expert tensors fused on load);
* :mod:`.sparse_format` - the compressed ``d2prune-sparse`` tensor layout;
* :mod:`.resume` - the work folder beside ``--out`` (crash-resume), :mod:`.save`
  - atomic output folders and ``d2prune.json``, :mod:`.budget` - the memory and
  disk estimate checked before a run.

Layer 2: imports only :mod:`d2prune.ops` and the foundation."""
