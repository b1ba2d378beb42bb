"""Tiny random mixture-of-experts models of each transformers 5 MoE family
(2 blocks, hidden 64, 4 experts, top-2), and how each stores its experts,
written out here by hand (independently of d2prune's reading of the layout
flags) so tests can check the fused parameters directly."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=64)

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def config(kind: str):
    if kind == "mixtral":
        return transformers.MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                                           num_experts_per_tok=2, **COMMON)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                           **COMMON)
    if kind == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
                                        pad_token_id=0, **COMMON)
    if kind == "gpt_oss":
        return transformers.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                         layer_types=["sliding_attention", "full_attention"], **COMMON)
    if kind == "deepseek_v3":  # every block a MoE block (first_k_dense_replace=0), with one shared expert
        return transformers.DeepseekV3Config(
            moe_intermediate_size=32, intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None, **COMMON)
    raise ValueError(kind)


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(kind)).eval()
    with torch.no_grad():  # random biases (GPT-OSS initialises them to zero), so they matter in the tests
        for n, p in model.named_parameters():
            if n.endswith("_bias") and "experts" in n:
                p.normal_(0, 0.02)
    return model


def experts_module(block):
    return block.mlp.experts


def expert_matrices(kind: str, experts, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s ``[d_out, d_in]`` gate / up / down matrices, read from
    the fused parameters as each class's own forward reads them."""
    gu, down = experts.gate_up_proj[e], experts.down_proj[e]
    if kind == "gpt_oss":  # [H, 2I] with gate / up interleaved by column; down [I, H]
        return {"gate_proj": gu[:, ::2].t(), "up_proj": gu[:, 1::2].t(), "down_proj": down.t()}
    half = gu.shape[0] // 2  # [2I, H] = [gate; up]; down [H, I]
    return {"gate_proj": gu[:half], "up_proj": gu[half:], "down_proj": down}


def save_with_tokenizer(kind: str, folder, tokenizer_from, seed: int = 0):
    """A tiny model of ``kind`` with the 512-token vocabulary of
    ``tokenizer_from`` (stories260K's), saved with that tokenizer, so the
    command line can calibrate and evaluate it on real text."""
    import shutil

    cfg = config(kind)
    cfg.vocab_size = 512
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer_from}/{f}", f"{folder}/{f}")
    return model
