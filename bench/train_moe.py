"""Train a small Qwen3-MoE language model on C4 text, for the MoE pruning benchmark.

    python bench/train_moe.py                      # ~8 minutes, 1 thread -> bench/_models/qwen3moe-c4
    python bench/train_moe.py --steps 600 --minutes 0 --out /tmp/moe   # a fixed number of steps, no time limit

A ``transformers`` ``Qwen3MoeForCausalLM`` built from a ``Qwen3MoeConfig`` (8
routed experts, top-2, no shared expert: Qwen3-MoE has none), trained from a
fixed seed with AdamW on random windows of the C4 training file in
``../shared`` (never on WikiText-2, the text it is evaluated on), with the
router's load-balancing loss (``router_aux_loss_coef``) and, because that loss
alone let experts die in every short run tried here, a per-step correction of
each router's expert offsets written into its weights (``balance_routers``;
routers also train at a tenth of the learning rate: Adam's early, sign-like
steps otherwise move all router logits together faster than any correction).
Every expert of every block then receives tokens. Saved with
``save_pretrained`` (safetensors) plus the tokenizer and ``train_log.json``
(arguments, steps, seconds, tokens seen, loss curve, per-expert routing share).

Tokenizer: the LLaMA-2 SentencePiece vocabulary (32000) rather than GPT-2's
BPE (50257), because in a model this small the (tied) embedding is the largest
single tensor and the LM head the largest per-token cost: at hidden 256 GPT-2's
vocabulary would cost 12.9M parameters against ~10M in all four blocks, and a
third more of each training step. ``--tokenizer`` takes either folder.

The learning-rate schedule runs over a fixed number of steps (``--steps``); when
only a time budget is given, that number is planned from the time of the first
steps, and the budget stays a hard stop. The run's log records the planned
steps and those done, so ``--steps N --stop-step K --minutes 0`` repeats it
exactly (same seed, same windows, one thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
TOKENIZERS = SHARED / "models" / "tokenizers"
PLAN_STEPS = 10  # steps timed to plan the schedule when only --minutes is given
PLAN_MARGIN = 0.95  # plan for 95% of the budget: the first steps are not the slowest ones

log = logging.getLogger("train_moe")


def load_tokenizer(path: Path):
    """The LLaMA-2 SentencePiece model (a folder holding ``tokenizer.model``)
    or any folder AutoTokenizer reads (GPT-2 BPE)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
        return LlamaTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token,
    so a training window may cross a document boundary as in GPT-style packing."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False).input_ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def read_docs(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_model(args, vocab_size: int, eos: int, bos: int | None):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        intermediate_size=args.moe_intermediate * args.top_k,  # unused: every block is an MoE block (mlp_only_layers empty)
        norm_topk_prob=True,  # the two chosen experts' weights sum to 1 (Qwen3-30B-A3B's setting)
        max_position_embeddings=args.seqlen, tie_word_embeddings=True, output_router_logits=True,
        router_aux_loss_coef=args.aux_coef, use_cache=False, eos_token_id=eos, bos_token_id=bos,
    )
    torch.manual_seed(args.seed)
    return Qwen3MoeForCausalLM(cfg)


def param_counts(model) -> dict:
    """Total parameters (the tied embedding once), parameters a token uses
    (top-k of the experts), and the experts' share of the decoder blocks' weights."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    blocks = model.model.layers
    block_w = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
    expert_w = sum(p.numel() for n, p in blocks.named_parameters() if ".experts." in n)
    active = total - expert_w + expert_w * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "active_per_token": active, "embedding": model.model.embed_tokens.weight.numel(),
            "block_weights": block_w, "expert_weights": expert_w, "expert_share_of_block_weights": expert_w / block_w}


@torch.no_grad()
def routing_share(model, windows: torch.Tensor) -> list[list[float]]:
    """Per block, the share of (token, slot) assignments each expert receives on
    ``windows``: the model's own router logits, top-k as its forward takes them."""
    was_training = model.training
    model.eval()
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, E)
    for w in windows:
        out = model(input_ids=w[None], output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            counts[i] += torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), minlength=E).float()
    model.train(was_training)
    return (counts / counts.sum(1, keepdim=True)).tolist()


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=w[None], labels=w[None], output_router_logits=False).loss.item() for w in windows]
    return sum(losses) / len(losses)


def watch_router_inputs(model) -> list[torch.Tensor | None]:
    """The mean router input of each block in the last forward (hooks on the routers)."""
    means: list[torch.Tensor | None] = [None] * len(model.model.layers)

    def hook(i):
        def pre(_module, inputs):
            means[i] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).mean(0)
        return pre

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_pre_hook(hook(i))
    return means


@torch.no_grad()
def balance_routers(model, router_logits, router_inputs, rate: float) -> None:
    """Load balancing without an auxiliary loss (DeepSeek-V3's bias update),
    written into the router weights so that the model stays a plain Qwen3-MoE.

    Early in training the router inputs become nearly the same for every token
    (the model first learns unigram statistics), so each expert's logit is
    dominated by a per-expert offset, the same few experts win the top-k of
    every token, and the others never train. The Switch loss does not undo that:
    with a flat softmax it sits at its balanced value (top_k) whatever the top-k
    counts (measured: dead experts by step 25 with coefficients 0.02, 0.1 and 1).
    Here each step moves expert i's logit on the mean router input c by
    ``rate * (1 - E * share_i)`` (share_i: its share of the step's top-k
    assignments), by adding that multiple of c / |c|^2 to its router row."""
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    for layer, logits, c in zip(model.model.layers, router_logits, router_inputs):
        share = torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), minlength=E).float()
        share /= share.sum()
        w = layer.mlp.gate.weight
        w += (rate * (1 - E * share)).to(w.dtype)[:, None] * (c / c.dot(c))[None, :]


def lr_at(step: int, steps: int | None, args) -> float:
    """Linear warm-up over a fixed number of steps (so the steps run while the
    schedule is being planned get the same rate as in a run given ``--steps``),
    then cosine decay to a tenth of the peak at ``steps``."""
    warm = args.warmup_steps
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "_models" / "qwen3moe-c4"))
    ap.add_argument("--train-file", default=str(C4), help="JSONL with a 'text' field (default: the shared C4 file)")
    ap.add_argument("--tokenizer", default=str(TOKENIZERS / "llama2_spm"), help="llama2_spm or gpt2_bpe folder")
    ap.add_argument("--heldout-docs", type=int, default=50, help="last N documents kept out of training, for a C4 validation loss")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=384)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss coefficient")
    ap.add_argument("--router-lr-scale", type=float, default=0.1, help="the routers' learning rate / --lr (balance_routers)")
    ap.add_argument("--balance-rate", type=float, default=0.1,
                    help="per-step router logit offset correction for expert load (0: the auxiliary loss alone)")
    ap.add_argument("--seqlen", type=int, default=256, help="training window; also the model's context length")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=20, help=f"linear warm-up steps (>= {PLAN_STEPS} when planning from --minutes)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0: planned from --minutes)")
    ap.add_argument("--stop-step", type=int, default=0,
                    help="stop after this step, the schedule still spanning --steps: repeats a run the budget cut short")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for the training loop (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark machine's cores are shared)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--share-every", type=int, default=50, help="log the least-used expert's routing share every N steps (0: never)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.steps <= 0 and args.minutes <= 0:
        ap.error("give --steps N or --minutes M (or both)")
    if args.stop_step and args.steps <= 0:
        ap.error("--stop-step needs --steps (the schedule it cuts short)")
    if args.steps <= 0 and args.warmup_steps < PLAN_STEPS:
        ap.error(f"--warmup-steps must be >= {PLAN_STEPS} when the steps are planned from --minutes")
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    t_setup = time.perf_counter()
    tok = load_tokenizer(Path(args.tokenizer))
    docs = read_docs(Path(args.train_file))
    train_docs, held_docs = docs[:-args.heldout_docs], docs[-args.heldout_docs:]
    stream = token_stream(tok, train_docs)
    held = token_stream(tok, held_docs)
    held_windows = held[: (held.numel() // args.seqlen) * args.seqlen].view(-1, args.seqlen)[:32]
    log.info("tokenizer %s (vocab %d); %d training documents -> %d tokens; %d held-out documents (%d windows)",
             Path(args.tokenizer).name, len(tok), len(train_docs), stream.numel(), len(held_docs), len(held_windows))

    model = build_model(args, len(tok), tok.eos_token_id, tok.bos_token_id)
    counts = param_counts(model)
    log.info("parameters: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in counts.items()})
    is_router = lambda n: n.endswith("mlp.gate.weight")  # noqa: E731
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not is_router(n)]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    routers = [p for n, p in model.named_parameters() if is_router(n)]
    # no weight decay on norms, nor on the routers: decay would pull back the balancing offsets (balance_routers)
    groups = [{"params": decay, "weight_decay": args.weight_decay, "scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "scale": 1.0},
              {"params": routers, "weight_decay": 0.0, "scale": args.router_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    router_inputs = watch_router_inputs(model)
    gen = torch.Generator().manual_seed(args.seed)
    log.info("setup %.1f s", time.perf_counter() - t_setup)

    steps = args.steps if args.steps > 0 else None  # None: plan after PLAN_STEPS timed steps
    budget = args.minutes * 60 if args.minutes > 0 else math.inf
    curve, step, t0 = [], 0, time.perf_counter()
    model.train()
    while True:
        if steps is None and step == PLAN_STEPS:
            steps = max(PLAN_STEPS + 1, int(budget * PLAN_MARGIN / ((time.perf_counter() - t0) / PLAN_STEPS)))
            log.info("planned %d steps for the %.1f-minute budget", steps, args.minutes)
        if steps is not None and step >= steps or step == args.stop_step > 0:
            break
        if time.perf_counter() - t0 >= budget:
            log.warning("time budget reached at step %d of %s", step, steps)
            break
        starts = torch.randint(0, stream.numel() - args.seqlen, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + args.seqlen] for s in starts.tolist()])
        lr = lr_at(step, steps, args)  # while planning (steps None) the step is inside the warm-up
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        o = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.balance_rate:
            balance_routers(model, o.router_logits, router_inputs, args.balance_rate)
        step += 1
        lm = o.loss.item() - args.aux_coef * o.aux_loss.item()
        curve.append((step, round(time.perf_counter() - t0, 2), round(lm, 4), round(o.aux_loss.item(), 4)))
        if step % args.log_every == 0 or step == 1:
            log.info("step %d/%s  %.0f s  lm loss %.4f  aux %.4f (balanced = %d)  lr %.2e",
                     step, steps, time.perf_counter() - t0, lm, o.aux_loss.item(), args.top_k, lr)
        if args.share_every and step % args.share_every == 0:  # the least-used expert of each block, on held-out C4
            least = [min(s) for s in routing_share(model, held_windows[:2])]
            log.info("step %d  least-used expert's share per block: %s", step, " ".join(f"{x:.3f}" for x in least))
    seconds = time.perf_counter() - t0
    tail = [c[2] for c in curve[-20:]]
    final = sum(tail) / len(tail)
    val = eval_loss(model, held_windows)
    share = routing_share(model, held_windows)
    log.info("trained %d steps in %.0f s, %d tokens; train lm loss (mean of last %d steps) %.4f; C4 held-out loss %.4f",
             step, seconds, step * args.batch_size * args.seqlen, len(tail), final, val)
    for i, s in enumerate(share):
        log.info("block %d expert share of routed tokens: %s", i, " ".join(f"{x:.3f}" for x in s))

    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # an inference checkpoint: no router logits unless asked
    model.config.use_cache = True
    model.eval()
    model.save_pretrained(out)  # safetensors
    tok.save_pretrained(out)
    record = {"command": "python bench/train_moe.py" + "".join(" " + a for a in (argv if argv is not None else sys.argv[1:])),
              "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "parameters": counts, "steps": step, "planned_steps": steps, "seconds": round(seconds, 1),
              "tokens_seen": step * args.batch_size * args.seqlen, "train_tokens_available": stream.numel(),
              "final_train_lm_loss": round(final, 4), "heldout_c4_loss": round(val, 4),
              "heldout_windows": len(held_windows), "routing_share_heldout_c4": share, "curve": curve}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    log.info("saved to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
