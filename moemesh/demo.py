"""A small DeepSeek-V3-architecture checkpoint with random weights, for the tests and benchmarks: written in
the published repositories' layout (sharded safetensors with an index, `rope_scaling` of type yarn, an MTP
layer) with a byte-level BPE tokenizer and a chat template. Its text is gibberish; the built-in model that
answers (`moemesh.builtin_model()`) is trained by `moemesh train-demo` (moemesh/train/)."""

from __future__ import annotations

import json
from pathlib import Path

from .spec.config import args_from_dict
from .spec.layout import block_shapes, head_shapes, layer_prefix, mtp_head_shapes
from .train.data import SPECIAL_TOKENS, tokenizer_config
from .train.run import TRAIN_CONFIG

# The built-in model's architecture with more experts and layers: the random checkpoint tests and benchmarks build.
DEMO_CONFIG = TRAIN_CONFIG | {
    "vocab_size": 1024, "intermediate_size": 768, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 192, "kv_lora_rank": 128,
    "moe_intermediate_size": 128, "n_routed_experts": 32,
}

# What the demo tokenizer learns its merges from.
CORPUS = """\
moemesh runs mixture-of-experts language models across the machines people already own: Mac minis,
Linux boxes with graphics cards, and plain computers on one network. A coordinator finds the workers,
measures them, splits the layers and the experts between them, and streams hidden states through them.
Each token is routed to a few experts out of many; the shared expert sees every token. The attention
keeps only a compressed latent and a small rotary key per token, so long contexts stay small in memory.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
"""


def _tokenizer(vocab_size: int) -> tuple[object, dict]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok, tokenizer_config(DEMO_CONFIG["max_position_embeddings"])


def write_random_checkpoint(path: Path, config: dict, seed: int = 0, shards: int = 2) -> Path:
    """A checkpoint of `config` with random weights (normal, std 0.02; unit norms; float32 router), written
    as `shards` safetensors files plus an index, with the demo tokenizer when the vocabulary fits."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    args = args_from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(head_shapes(args))
    for layer in range(args.num_hidden_layers):
        shapes |= block_shapes(args, layer)
    for layer in args.mtp_layers:
        shapes |= block_shapes(args, layer)
        shapes |= {layer_prefix(layer) + k: v for k, v in mtp_head_shapes(args).items()}
        shapes[layer_prefix(layer) + "shared_head.head.weight"] = (args.vocab_size, args.hidden_size)

    weight_map: dict[str, str] = {}
    names = sorted(shapes)
    total = 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for name in names[i * len(names) // shards : (i + 1) * len(names) // shards]:
            shape = shapes[name]
            if name.endswith("e_score_correction_bias"):
                t = torch.randn(shape, generator=gen) * 0.01
            elif len(shape) == 1:  # norm weights
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * 0.02
            keep_fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
            tensors[name] = t.to(torch.float32 if keep_fp32 else torch.bfloat16).contiguous()
            weight_map[name] = file
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    eos = config.get("eos_token_id")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos}))
    tok, tok_config = _tokenizer(DEMO_CONFIG["vocab_size"])
    if tok.get_vocab_size() <= args.vocab_size:
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    return path


def build_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint to `path`; its vocabulary is as many tokens as the tokenizer learned."""
    tok, _ = _tokenizer(DEMO_CONFIG["vocab_size"])
    return write_random_checkpoint(path, DEMO_CONFIG | {"vocab_size": tok.get_vocab_size()}, seed)
