"""Pure tensor math with no model knowledge: mask rules (per row, per matrix,
SparseGPT's per-block threshold, vectorised N:M: :mod:`.masks`) and the fp32
input statistics the methods score with (running Hessians, squared norms, one
per distinct input tensor: :mod:`.stats`).

Layer 1: imports only the foundation (:mod:`d2prune.errors`, :mod:`d2prune.config`)."""
