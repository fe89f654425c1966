"""The training loop of `moemesh train-demo`: corpus and tokenizer, AdamW with warmup and cosine decay over
a wall-clock budget, next-token + MTP loss, auxiliary-loss-free routing balance, a held-out evaluation, and
the checkpoint written in the Hugging Face layout."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..spec.config import args_from_dict
from ..spec.routing import RoutingStats
from . import data
from .export import Report, write_card, write_checkpoint, write_routing
from .model import DeepseekV3

# The built-in model: the DeepSeek-V3 block scaled down to what two CPU cores train in ~25 minutes.
TRAIN_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}


@dataclass
class Settings:
    minutes: float = 25.0
    max_steps: int | None = None  # stop after this many steps even with time left (tests)
    seed: int = 0
    batch: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    bias_gamma: float = 1e-3  # the routing bias's step per training step
    eval_windows: int = 48
    max_files: int | None = None  # a prefix of the shuffled corpus (tests)
    tokenizer_bytes: int = 8_000_000
    weight_format: str = "bf16"
    bf16: bool = True  # matmuls in bfloat16 (autocast), master weights and optimizer state in float32
    config: dict = field(default_factory=lambda: dict(TRAIN_CONFIG))
    stdlib: Path | None = None


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    mtp_accuracy: float
    routing: RoutingStats


StepReport = Callable[[int, float, float, float], None]  # (step, loss, tokens/s, fraction of budget done)


def losses(model: DeepseekV3, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss, MTP loss) of windows [b, t+1]."""
    x, y = batch[:, :-1], batch[:, 1:]
    logits, mtp_logits = model(x)
    main = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if mtp_logits is None:
        return main, torch.zeros(())
    return main, F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: DeepseekV3, windows: torch.Tensor, batch: int = 8) -> Evaluation:
    """Held-out loss, next-token accuracy and MTP (token after next) accuracy; the routing counts of every MoE
    layer over these windows."""
    model.eval()
    a = model.a
    stats = RoutingStats(a.n_routed_experts)
    loss_sum = correct = mtp_correct = count = mtp_count = 0.0
    for chunk in windows.split(batch):
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits, mtp_logits = model(x)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        if mtp_logits is not None:
            mtp_correct += (mtp_logits.argmax(-1) == y[:, 1:]).sum().item()
            mtp_count += y[:, 1:].numel()
        for layer, moe in model.moe_layers().items():
            stats.add(layer, moe.load.tolist())
        stats.tokens += x.numel()
    model.train()
    return Evaluation(loss_sum / count, correct / count, mtp_correct / max(mtp_count, 1), stats)


def lr_at(s: Settings, step: int, done: float) -> float:
    """Linear warmup, then cosine decay to min_lr_fraction over the budget (`done` runs 0 -> 1)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return s.lr * (s.min_lr_fraction + (1 - s.min_lr_fraction) * cosine)


def optimizer(model: DeepseekV3, s: Settings) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": s.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def train(out: Path, s: Settings, report: StepReport | None = None, log: Callable[[str], None] = print,
          command: str = "moemesh train-demo") -> Evaluation:
    """Train the model of `s.config` for `s.minutes` (or `s.max_steps`) and write it to `out`."""
    t0 = time.monotonic()
    torch.manual_seed(s.seed)
    corpus = data.split_corpus(s.stdlib, seed=s.seed, max_files=s.max_files)
    log(f"corpus: {len(corpus.train)} train / {len(corpus.held_out)} held-out files from {corpus.root}")
    tok = data.train_tokenizer(corpus.train, s.config["vocab_size"], s.tokenizer_bytes)
    config = s.config | {"vocab_size": tok.get_vocab_size()}
    train_ids, held_ids = data.encode_files(tok, corpus.train), data.encode_files(tok, corpus.held_out)
    log(f"tokenizer: {tok.get_vocab_size()} tokens; {len(train_ids):,} train / {len(held_ids):,} held-out tokens "
        f"({time.monotonic() - t0:.0f} s)")
    args = args_from_dict(config)
    model = DeepseekV3(args, seed=s.seed)
    params = sum(p.numel() for p in model.parameters())
    opt = optimizer(model, s)
    windows = data.eval_windows(held_ids, s.seq_len, s.eval_windows)
    gen = torch.Generator().manual_seed(s.seed)
    budget = s.minutes * 60
    start, step, tokens = time.monotonic(), 0, 0
    while True:
        done = (time.monotonic() - start) / budget
        if s.max_steps is not None:
            done = max(done, step / s.max_steps)
        if done >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(s, step, done)
        t_step = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            main, mtp = losses(model, data.random_batches(train_ids, s.batch, s.seq_len, gen))
        opt.zero_grad(set_to_none=True)
        (main + s.mtp_weight * mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for moe in model.moe_layers().values():
            moe.balance(s.bias_gamma)
        step += 1
        tokens += s.batch * s.seq_len
        if report:
            report(step, main.item(), s.batch * s.seq_len / (time.monotonic() - t_step), done)
    wall = time.monotonic() - start
    result = evaluate(model, windows)
    log(f"{step} steps in {wall / 60:.1f} min; held-out loss {result.loss:.3f}, next-token accuracy "
        f"{100 * result.accuracy:.1f}%, MTP accuracy {100 * result.mtp_accuracy:.1f}%")
    write_checkpoint(model, config, out, s.weight_format)
    data.save_tokenizer(tok, out, config["max_position_embeddings"])
    write_routing(result.routing, out)
    corpus_name = f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library"
    write_card(out, config, Report(corpus_name, len(corpus.train), len(corpus.held_out), len(train_ids), step, tokens,
                                   wall, result.loss, result.accuracy, result.mtp_accuracy, command),
               s.weight_format, params)
    return result
