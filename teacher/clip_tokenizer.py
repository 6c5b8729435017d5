"""An offline CLIP tokenizer, built from a word list instead of downloaded.

The vocabulary follows CLIP's layout: the 256 byte-level symbols, the same with the end-of-word
marker ``</w>``, the merged symbols, then the start/end tokens. Merges are added word by word:
each word is run through BPE with the merges so far, and merges joining its leftover pieces are
appended until it is a single token. Merges appended later rank below all earlier ones, so they
never change how an earlier word is split. Any other word still tokenises, into byte symbols, so
no text maps to ``unk`` and different words get different ids. With no words (the tiny random
model) every word is spelled byte by byte.

The folder written holds tokenizer.json (what transformers v5 writes) and vocab.json + merges.txt,
so both ``CLIPTokenizer`` and ``CLIPTokenizerFast`` load it, as do diffusers pipelines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

MODEL_MAX_LENGTH = 77  # CLIP's context length, as Stable Diffusion 1.x
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, symbols)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the best-ranked adjacent pair."""
    byte_map = bytes_to_unicode()
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    parts = symbols[:-1] + [symbols[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def build_vocab(words: Sequence[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges giving each word in ``words`` a single token."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(words: Sequence[str] = ()):
    """A ``CLIPTokenizer`` (transformers v5, tokenizers backend) for the given words."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


def save_tokenizer(folder: str | os.PathLike, words: Sequence[str] = ()) -> None:
    """Write a folder that every CLIP tokenizer class loads: tokenizer.json, vocab.json, merges.txt."""
    folder = Path(folder)
    vocab, merges = build_vocab(words)
    build_tokenizer(words).save_pretrained(folder)
    # transformers v5 writes only tokenizer.json; the slow-format files let older loaders
    # (and anyone reading the folder) use it too.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", "utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
