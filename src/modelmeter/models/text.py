"""Tokenization on the request path, without torch: what a front needs to count a request's tokens and hand the
engine its ids. Shared by the in-process backends (``backends.py``) and the fronts (``TextEncoders``).

A model's encoder comes from its artifact directory alone (``tokenizer.json`` and ``config.json``); a LoRA adapter
uses its base's. Nothing here imports torch or transformers: a front process stays free of both.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


class InputTooLong(Exception):
    """An input has more tokens than the model accepts and truncation was not requested."""

    def __init__(self, index: int, tokens: int, max_length: int) -> None:
        super().__init__(f"input {index} has {tokens} tokens; the model accepts at most {max_length}")
        self.index = index
        self.tokens = tokens
        self.max_length = max_length


class TooManyCharacters(Exception):
    """An input longer than any input of ``max_length`` tokens plausibly is, refused before the tokenizer reads it."""

    def __init__(self, index: int, chars: int, limit: int) -> None:
        super().__init__(f"input {index} has {chars} characters; at most {limit} are read")
        self.index = index
        self.chars = chars
        self.limit = limit


# Characters read per token of the model's context: WordPiece tokens of English average ~4-5 characters, and a
# word over 100 characters is one [UNK], so max_length x 32 characters hold max_length tokens for any text a
# person writes. The bound comes before the tokenizer: a 1 MiB input cost ~0.8 s of CPU to be refused (issue 21).
CHARS_PER_TOKEN = 32


@dataclass(frozen=True, slots=True)
class Encoded:
    """Token ids per input (special tokens included) and the billable token count of each."""

    ids: list[list[int]]
    tokens: list[int]
    # With ``spans``: each token's character offsets into its input, and 1 for special tokens ([CLS], [SEP]).
    offsets: list[list[tuple[int, int]]] | None = None
    special: list[list[int]] | None = None
    pieces: list[list[str]] | None = None  # the tokens' strings (WordPiece marks a continuation with ##)

    @property
    def total_tokens(self) -> int:
        """Billable tokens of the whole request."""
        return sum(self.tokens)


class TextEncoder:
    """One model's tokenizer, configured once, and the facts a front checks before compute."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int, dimensions: int) -> None:
        self._whole, self._truncating = encoders(tokenizer, max_length)
        self.max_length = max_length
        self.dimensions = dimensions
        unk = getattr(tokenizer.model, "unk_token", None)
        self.unk_id: int | None = tokenizer.token_to_id(unk) if isinstance(unk, str) else None

    @classmethod
    def load(cls, path: Path, *, max_length: int = 512) -> TextEncoder:
        """From a ``save_pretrained`` directory: ``tokenizer.json`` (a fast tokenizer) and ``config.json``."""
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is required")
        config = json.loads((path / "config.json").read_text())
        limit = min(max_length, int(config.get("max_position_embeddings", max_length)))
        width = config.get("hidden_size") or config.get("dim") or config.get("d_model") or 0  # BERT, DistilBERT, ...
        return cls(Tokenizer.from_file(str(tokenizer_file)), max_length=limit, dimensions=int(width))

    def tokenize(self, texts: list[str], *, truncate: bool, spans: bool = False) -> Encoded:
        """Token ids and billable counts for ``texts``; raise :class:`InputTooLong` unless ``truncate``. With
        ``spans``, also each token's character offsets and which tokens are special (a tagger's answer needs
        them)."""
        if not texts:
            return Encoded(ids=[], tokens=[])
        limit = self.max_length * CHARS_PER_TOKEN
        if truncate:  # only a prefix can reach the kept tokens
            texts = [t[:limit] if len(t) > limit else t for t in texts]
        else:
            for index, text in enumerate(texts):
                if len(text) > limit:
                    raise TooManyCharacters(index, len(text), limit)
        encoder = self._truncating if truncate else self._whole
        # A lone text skips encode_batch's rayon fan-out, which would compete with the forward pass for the cores.
        batch = [encoder.encode(texts[0])] if len(texts) == 1 else encoder.encode_batch(texts)
        ids = [encoding.ids for encoding in batch]
        for index, row in enumerate(ids):
            if len(row) > self.max_length:
                raise InputTooLong(index, len(row), self.max_length)
        if spans:
            return Encoded(ids=ids, tokens=[len(row) for row in ids], offsets=[e.offsets for e in batch],
                           special=[e.special_tokens_mask for e in batch], pieces=[e.tokens for e in batch])
        return Encoded(ids=ids, tokens=[len(row) for row in ids])


class TextEncoders:
    """Encoders by artifact directory, loaded on first use and kept (a handful: fine-tunes share their base's
    tokenizer, and full copies bring their own)."""

    def __init__(self, *, max_entries: int = 64) -> None:
        self._by_path: OrderedDict[Path, TextEncoder] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def peek(self, path: Path) -> TextEncoder | None:
        """The encoder when already loaded (no file is read)."""
        return self._by_path.get(path)

    def get(self, path: Path) -> TextEncoder:
        with self._lock:
            found = self._by_path.get(path)
            if found is not None:
                self._by_path.move_to_end(path)
                return found
        encoder = TextEncoder.load(path)
        with self._lock:
            self._by_path[path] = encoder
            while len(self._by_path) > self._max:
                self._by_path.popitem(last=False)
        return encoder


# Fine-tunes share their base's tokenizer: one pair of encoders per distinct tokenizer, not per loaded model
# (each pair costs ~13 MB of resident memory for a BERT vocabulary; measured in bench/tenants.py's RSS figures).
_ENCODER_CACHE: OrderedDict[tuple[str, int], tuple[Tokenizer, Tokenizer]] = OrderedDict()
_ENCODER_CACHE_SIZE = 8
_ENCODER_LOCK = threading.Lock()


def encoders(tokenizer: Tokenizer, max_length: int) -> tuple[Tokenizer, Tokenizer]:
    """Two copies configured once: without truncation, and truncating to ``max_length``.

    Reconfiguring one tokenizer per call (what ``PreTrainedTokenizerFast.__call__`` does) races when
    requests tokenize from several threads ("Already borrowed"); encoding alone is safe to share, so models
    with the same tokenizer share one pair.
    """
    spec = tokenizer.to_str()
    key = (hashlib.sha256(spec.encode()).hexdigest(), max_length)
    with _ENCODER_LOCK:
        cached = _ENCODER_CACHE.get(key)
        if cached is not None:
            _ENCODER_CACHE.move_to_end(key)
            return cached
    whole = Tokenizer.from_str(spec)
    whole.no_truncation()
    whole.no_padding()
    truncating = Tokenizer.from_str(spec)
    truncating.no_padding()
    truncating.enable_truncation(max_length)
    with _ENCODER_LOCK:
        _ENCODER_CACHE[key] = (whole, truncating)
        while len(_ENCODER_CACHE) > _ENCODER_CACHE_SIZE:
            _ENCODER_CACHE.popitem(last=False)
    return whole, truncating
