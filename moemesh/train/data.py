"""The training corpus and tokenizer of the built-in model: the Python standard library's own sources,
which every machine with Python has offline. Files are split into train and held-out sets with a fixed
seed (by file, so held-out text is code the model never saw), and a byte-level BPE tokenizer is trained
on the train files alone."""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0..3: bos_token_id 0, eos_token_id 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% else %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
# Vendored third-party code and the test suites are left out: the model learns the library itself.
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Corpus:
    root: Path
    train: list[Path]
    held_out: list[Path]

    @property
    def train_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.train)


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted (the same list on every run)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files)


def split_corpus(root: Path | None = None, held_out_fraction: float = 0.05, seed: int = 0,
                 max_files: int | None = None) -> Corpus:
    """Shuffle the files with `seed`; the first `held_out_fraction` of them (at least one) are held out.
    `max_files` keeps a prefix of the shuffled list (a small corpus for tests)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(root)
    if len(files) < 2:
        raise ValueError(f"{root}: found {len(files)} Python source files; need at least 2 to hold one out")
    random.Random(seed).shuffle(files)
    files = files[:max_files] if max_files else files
    n_held = max(1, round(len(files) * held_out_fraction))
    return Corpus(root, files[n_held:], files[:n_held])


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, max_bytes: int = 8_000_000):
    """Byte-level BPE over (at most `max_bytes` of) the given files, with the chat special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        seen = 0
        for path in files:
            if seen >= max_bytes:
                return
            text = read_text(path)
            seen += len(text)
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    return tok


def tokenizer_config(max_length: int) -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE, "model_max_length": max_length}


def save_tokenizer(tok, path: Path, max_length: int) -> None:
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_length), indent=2, ensure_ascii=False))


def encode_files(tok, files: list[Path]) -> torch.Tensor:
    """All files as one token stream, each file as BOS + its tokens + EOS (int32 [n])."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([read_text(p) for p in files], add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.int32)


def random_batches(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """One batch of random windows [batch, seq_len + 1] (inputs and, shifted by one, targets)."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq_len + 1] from the start of the held-out stream (the
    same windows every time, so held-out figures compare across runs)."""
    n = min(max_windows, (len(stream) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).long()
