"""The supported-architecture table of the README, computed.

One tiny random model per transformers family (dense and mixture-of-experts,
plus families d2prune refuses), and :func:`row`: what d2prune does with it,
as the README's table states it. ``tests/test_archs.py`` recomputes every row
and compares it with the README; ``python tests/arch_zoo.py`` prints the
table (paste it between the README's ``archs`` markers)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
import moe_models  # noqa: E402

C = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=64)

DENSE = {
    "gemma3_text": lambda: tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=4, **C),
    "phi": lambda: tf.PhiConfig(**C),
    "olmo2": lambda: tf.Olmo2Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2, **C),
    "granite": lambda: tf.GraniteConfig(num_key_value_heads=2, **C),
    "cohere": lambda: tf.CohereConfig(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **C),
    "stablelm": lambda: tf.StableLmConfig(num_key_value_heads=2, **C),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**C),
    "falcon": lambda: tf.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=True, num_kv_heads=2),
    "bloom": lambda: tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4),
}
REFUSED = {
    "llama4_text": lambda: tf.Llama4TextConfig(hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               vocab_size=128, num_local_experts=4, head_dim=16),
}
FAMILIES = (["opt", "gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"] + list(DENSE)
            + list(moe_models.ARCHS) + list(REFUSED))


def model(arch: str):
    torch.manual_seed(0)
    if arch in moe_models.ARCHS:
        return moe_models.tiny(arch)
    cfg = DENSE[arch]() if arch in DENSE else REFUSED[arch]() if arch in REFUSED else tiny_config(arch)
    cls = tf.Llama4ForCausalLM if arch == "llama4_text" else tf.AutoModelForCausalLM
    return (cls(cfg) if arch == "llama4_text" else cls.from_config(cfg)).eval()


def _outcome(m, arch: str, method: str) -> str:
    import copy

    from d2prune import D2PruneError, PruneConfig, prune

    m = copy.deepcopy(m)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    try:
        report = prune(m, PruneConfig(method=method, sparsity=0.5), ids, heldout=held)
    except D2PruneError as e:
        return "refused: " + str(e).split(":")[0].split(" (")[0]
    pruned = [r for r in report.layers if r.how not in ("router", "bias", "embedding", "ignored", "vector", "norm")]
    assert all(r.sparsity >= 0.5 for r in pruned), arch
    return f"✓ ({report.overall_sparsity:.3f} of all block weights)"


def row(arch: str) -> dict[str, str]:
    """The README row of ``arch``: SparseGPT 50% (every method prunes the same layers: the mask rule is
    the only difference; tests/test_moe.py runs all six on experts) and D²Prune's default --frozen auto."""
    m = model(arch)
    from d2prune.io.experts import experts_layout

    layouts = {type(x).__name__: experts_layout(x) for x in m.modules()
               if any(p.dim() == 3 for n, p in x.named_parameters(recurse=False) if n.endswith("proj"))}
    if not layouts:
        experts = "-"
    else:
        name, lay = next(iter(layouts.items()))
        experts = (f"{name}: " + ("unknown layout" if lay is None else ", ".join(
            f for f, on in (("transposed", lay.transposed), ("interleaved", not lay.concatenated),
                            ("bias", lay.bias)) if on) or "[gate; up]"))
    return {"family": f"`{m.config.model_type}`", "experts": experts,
            "sparsegpt 50%": _outcome(m, arch, "sparsegpt"), "d2prune (--frozen auto)": _outcome(m, arch, "d2prune")}


def table(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import logging
    logging.disable(logging.WARNING)
    print(table([row(a) for a in FAMILIES]))
