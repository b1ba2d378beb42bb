"""d2prune: post-training sparsification of HuggingFace causal LMs.

>>> from d2prune import PruneConfig, load_model, prune, sample_calibration, read_texts
>>> model, tok, _ = load_model("../shared/models/stories260K")                   # doctest: +SKIP
>>> calib = sample_calibration(tok, read_texts("c4.jsonl"), nsamples=128, seqlen=256)  # doctest: +SKIP
>>> report = prune(model, PruneConfig(method="wanda", sparsity=0.5), calib)       # doctest: +SKIP
"""


from .deploy.compress import compress_folder, from_pretrained, is_compressed, register_with_transformers
from .config import MethodConfig, PruneConfig, Sparsity, parse_method_spec
from .methods.d2prune import D2PruneConfig
from .methods.magnitude import MagnitudeConfig
from .methods.pruner_zero import PrunerZeroConfig
from .methods.sparsegpt import SparseGPTConfig
from .methods.wanda import WandaConfig
from .io.data import eval_text, eval_windows, read_texts, sample_calibration
from .errors import D2PruneError
from .evaluation.perplexity import PerplexityResult, perplexity
from .io.modeling import find_blocks, find_prunable, load_model
from .pruning import LayerReport, PruneReport, prune
from .io.save import save_pruned


__version__ = "0.1.0"

# AutoModelForCausalLM.from_pretrained(compressed folder) after `import d2prune`
register_with_transformers()

__all__ = [
    "D2PruneConfig", "D2PruneError", "LayerReport", "PrunerZeroConfig", "parse_method_spec", "MagnitudeConfig", "MethodConfig", "PerplexityResult", "PruneConfig",
    "PruneReport", "SparseGPTConfig", "Sparsity", "WandaConfig", "eval_text", "eval_windows", "find_blocks",
    "find_prunable", "compress_folder", "from_pretrained", "is_compressed", "load_model", "perplexity", "prune", "read_texts", "sample_calibration", "save_pruned",
]
