"""Build CLIP-compatible BPE tokenizer files for a closed vocabulary.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE (``vocab.json`` + ``merges.txt``).
dori's miniworld and tiny test models ship their own small tokenizer in the same format, so that
the real ``transformers.CLIPTokenizer`` loads it with no hub access. Every single byte stays in
the vocabulary, so any text (a real LAION caption too) tokenizes; words of the closed vocabulary
become one token each (merges are added by simulating BPE, so a word's merges never compete with
another word's).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode table used by GPT-2 and CLIP BPE files."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as CLIP's tokenizer does it: merge the lowest-ranked adjacent pair until none is left."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        known = [(r, i) for r, i in pairs if r is not None]
        if not known:
            break
        rank = min(known)[0]
        pair = next((symbols[i], symbols[i + 1]) for r, i in known if r == rank)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_clip_tokenizer_files(words: list[str], out_dir: str | Path, model_max_length: int) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for ``words``.

    Args:
        words: the closed vocabulary (lower-case words without spaces); order fixes token ids.
        out_dir: folder to write (created).
        model_max_length: tokens per prompt, start and end tokens included (77 for SD).

    Returns:
        The folder, loadable with ``transformers.CLIPTokenizer.from_pretrained``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _bytes_to_unicode()
    base = list(table.values())
    vocab: dict[str, int] = {}
    for tok in base + [c + "</w>" for c in base]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words if w):
        chars = [table[b] for b in word.encode("utf-8")]
        # BPE applies the lowest-ranked merge first, across all words: run it with the merges so far and
        # append merges (lowest priority, so earlier words keep their single token) until one symbol remains.
        symbols = _bpe(chars[:-1] + [chars[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = _bpe(symbols, ranks)
    for tok in SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2),
        encoding="utf-8",
    )
    return out
