"""Byte-level BPE tokenizer: trained with the `rustbpe` wheel, run with `tiktoken`.

On-disk format of a tokenizer directory (no pickle; every file is readable by hand):

    tokenizer.tiktoken       one token per line: "<base64 of the token's bytes> <rank>", ranks 0..n-1
                             (tiktoken's own .tiktoken format; the first 256 ranks are the single bytes)
    tokenizer.json           {"format": "nanochat-tiktoken-v1", "pattern": <split regex>,
                              "special_tokens": {"<|bos|>": n, ...}, "vocab_size": n + len(special)}
    token_bytes.safetensors  "token_bytes": int64 [vocab_size], the UTF-8 byte length of each token,
                             0 for special tokens (bits per byte ignores them)

Special tokens follow nanochat: `<|bos|>` delimits documents (it gets the first id after the merges), then
the chat tokens.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken
import torch
from safetensors.torch import load_file, save_file

from nanochat.common import get_base_dir

# GPT-4's split pattern, with numbers split into runs of at most 2 digits (as nanochat does) instead of 3:
# smaller vocabularies waste fewer entries on 3-digit numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",              # every document starts with it (the loader prepends it)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
FORMAT = "nanochat-tiktoken-v1"
RANKS_FILE, META_FILE, TOKEN_BYTES_FILE = "tokenizer.tiktoken", "tokenizer.json", "token_bytes.safetensors"


class Tokenizer:
    """A tiktoken Encoding plus nanochat's special tokens."""

    def __init__(self, ranks: dict[bytes, int], pattern: str):
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError("token ranks must be exactly 0..n-1")
        self.ranks, self.pattern = ranks, pattern
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Train BPE on `texts` (an iterator is consumed once) to `vocab_size` ids, special tokens included."""
        import rustbpe  # training only; encoding never needs it

        num_merged = vocab_size - len(SPECIAL_TOKENS)
        if num_merged < 256:
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), num_merged, pattern=pattern)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, directory: Path) -> None:
        """Write the three files of the on-disk format (module docstring) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        (directory / RANKS_FILE).write_text("".join(lines), encoding="ascii")
        meta = {"format": FORMAT, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab_size": self.get_vocab_size()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        save_file({"token_bytes": self.token_bytes()}, str(directory / TOKEN_BYTES_FILE))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(directory / TOKEN_BYTES_FILE, 0o666 & ~umask)   # safetensors writes 0600; the others are 0666-umask

    @classmethod
    def from_directory(cls, path: Path) -> Tokenizer:
        path = Path(path)
        meta_path, ranks_path = path / META_FILE, path / RANKS_FILE
        for p in (meta_path, ranks_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: not a tokenizer directory (train one with scripts.tok_train)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        ranks = {}
        for lineno, line in enumerate(ranks_path.read_text(encoding="ascii").splitlines(), 1):
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{ranks_path}:{lineno}: expected '<base64> <rank>', got {line[:60]!r}") from e
        tok = cls(ranks, meta["pattern"])
        if tok.special_tokens != meta["special_tokens"]:
            raise ValueError(f"{meta_path}: special tokens {meta['special_tokens']} differ from this code's "
                             f"{tok.special_tokens}")
        return tok

    # ------------------------------------------------------------------ use
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> set[str]:
        return set(self.special_tokens)

    def encode_special(self, name: str) -> int:
        return self.enc.encode_single_token(name)

    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self.ranks)

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def encode(self, text: str | list[str], prepend: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ordinary text -> ids (special-token strings in the text are encoded as plain text, never as
        specials). `prepend` (an id or a special token's name, e.g. "<|bos|>") goes before each text."""
        if isinstance(prepend, str):
            prepend = self.encode_special(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [prepend, *ids] if prepend is not None else ids
        if not isinstance(text, list):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend is not None:
            batch = [[prepend, *ids] for ids in batch]
        return batch

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab]: UTF-8 byte length of each token, 0 for special tokens."""
        lengths = torch.zeros(self.get_vocab_size(), dtype=torch.int64)
        for token, rank in self.ranks.items():
            lengths[rank] = len(token)
        return lengths


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | None = None) -> Tokenizer:
    """Train and (if `out_dir`) save; the one call scripts and fixtures need."""
    tok = Tokenizer.train_from_iterator(texts, vocab_size)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def default_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer(path: Path | None = None) -> Tokenizer:
    return Tokenizer.from_directory(path or default_tokenizer_dir())


def get_token_bytes(path: Path | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """The token byte lengths saved beside the tokenizer (int64 [vocab], 0 for special tokens)."""
    file = Path(path or default_tokenizer_dir()) / TOKEN_BYTES_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: not a tokenizer directory (train one with scripts.tok_train)")
    return load_file(str(file))["token_bytes"].to(device)


def iter_capped(texts: Iterable[str], max_chars: int, doc_cap: int = 10_000) -> Iterator[str]:
    """Texts cut to `doc_cap` characters each, stopping after `max_chars` characters in all (training input)."""
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        text = text[:doc_cap]
        seen += len(text)
        yield text
