"""Tokenizers for STSO corpora, built from a short spec string.

Three kinds exist, chosen by :func:`build_tokenizer`:

``"byte"`` (the default)
    UTF-8 bytes 0..255 plus ``<|endoftext|>`` = 256. Needs no files, so the
    built-in corpus and the tests run anywhere.
``"gpt2:<dir>"`` or a bare directory path
    OpenAI's GPT-2 byte-level BPE (50257 ids, ``<|endoftext|>`` = 50256) read from
    ``vocab.json`` and ``merges.txt`` in ``<dir>`` through transformers' fast
    tokenizer. Nothing is downloaded.
``"hf:<hub id>"``
    ``AutoTokenizer.from_pretrained(<hub id>)``. This is the only kind that may use
    the network, and only because the user named a hub id explicitly. Without
    network access a cached copy is used if one exists, otherwise a
    :class:`~stso_env.errors.DataError` says how to avoid the hub.

``encode`` never emits the end-of-text id, not even for a literal
``"<|endoftext|>"`` in the text: document boundaries come only from the corpus
loader, so a stray marker inside a data file cannot split a document.
"""

from __future__ import annotations

import abc
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stso_env.errors import DataError

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
GPT2_FILES = ("vocab.json", "merges.txt")

SPEC_FORMS = (
    "'byte' (UTF-8 bytes, no files needed), "
    "'gpt2:<dir>' or a directory path holding vocab.json and merges.txt "
    "(e.g. ../shared/data/gpt2-tokenizer), "
    "'hf:<hub id>' (downloads from the Hugging Face hub)"
)

# Environment variables with which huggingface_hub, transformers and datasets are
# told not to touch the network.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}

# A batch of this many documents keeps the Rust tokenizer's threads busy while the
# Python lists it returns stay small.
_BATCH_DOCS = 4096


class Tokenizer(abc.ABC):
    """Maps text to int32 token ids and back.

    Attributes:
        name: Short human name ("byte", "gpt2", or the hub id).
        vocab_size: Number of ids, end-of-text included; every id is below it.
        eos_id: The end-of-text id that the corpus loader puts between documents.
        spec: The string that :func:`build_tokenizer` turns back into this tokenizer.
    """

    name: str
    vocab_size: int
    eos_id: int
    spec: str

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Return the ids of ``text`` as a 1-D int32 array, without an end-of-text id."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Return the text of ``ids``; the end-of-text id is written as ``<|endoftext|>``."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts; subclasses override this where batching is faster."""
        return [self.encode(text) for text in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, ``<|endoftext|>`` as 256.

    Every string round-trips exactly, since UTF-8 encodes any unicode string.
    """

    def __init__(self) -> None:
        self.name = "byte"
        self.vocab_size = 257
        self.eos_id = 256
        self.spec = "byte"

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as int32 ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Return the text of ``ids``.

        Byte runs that are not valid UTF-8 (possible in sampled model output) become
        U+FFFD instead of failing.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise DataError(f"byte tokenizer: id {int(arr[bad][0])} is outside 0..{self.vocab_size - 1}")
        pieces: list[str] = []
        start = 0
        for pos in np.flatnonzero(arr == self.eos_id).tolist():
            pieces.append(arr[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
            pieces.append(EOT_TEXT)
            start = pos + 1
        pieces.append(arr[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(pieces)


class HFTokenizer(Tokenizer):
    """Wraps a transformers tokenizer (the local GPT-2 BPE or a hub tokenizer)."""

    def __init__(self, hf_tokenizer: Any, *, name: str, spec: str) -> None:
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise DataError(
                f"tokenizer {spec!r} has no end-of-text token, which the corpus loader needs "
                f"between documents; use one of: {SPEC_FORMS}"
            )
        self._tok = hf_tokenizer
        self.name = name
        # len() counts added special tokens; vocab_size alone can miss them.
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = int(eos)
        self.spec = spec

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # split_special_tokens: a literal "<|endoftext|>" in a data file is text,
        # not a document boundary (see the module docstring).
        out = self._tok(
            texts,
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
        )
        return out["input_ids"]

    def encode(self, text: str) -> np.ndarray:
        """Return the BPE ids of ``text`` as int32, without special tokens."""
        return np.asarray(self._ids([text])[0], dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode texts in batches, which the Rust backend runs in parallel.

        One call per document list is several times faster than encoding one huge
        string, whose pre-tokenization runs on a single thread.
        """
        texts = list(texts)
        arrays: list[np.ndarray] = []
        for start in range(0, len(texts), _BATCH_DOCS):
            for ids in self._ids(texts[start : start + _BATCH_DOCS]):
                arrays.append(np.asarray(ids, dtype=np.int32))
        return arrays

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Return the text of ``ids`` exactly as encoded (no space clean-up)."""
        id_list = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        return self._tok.decode(id_list, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE_VALUES


def _hub_endpoint() -> tuple[str, int]:
    """Return the host and port that a hub request would first connect to."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(var)
        if proxy:
            parsed = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if parsed.hostname:
                return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    parsed = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)


def hub_offline_reason(timeout_s: float = 3.0) -> str | None:
    """Say why the Hugging Face hub cannot be used now, or return None if it can.

    The hub libraries retry a failed connection for about 25-50 s before giving up,
    so an unreachable hub is detected up front: an offline variable is set, or a TCP
    connection to the hub (or the HTTPS proxy) fails within ``timeout_s``. Name
    resolution runs in a daemon thread because ``getaddrinfo`` ignores socket
    timeouts.
    """
    for var in _OFFLINE_VARS:
        if _env_true(var):
            return f"{var}={os.environ[var]} is set"
    host, port = _hub_endpoint()
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=probe, name="stso-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout_s:.0f} s"
    if result[0] is not None:
        return f"cannot connect to {host}:{port} ({result[0]})"
    return None


@contextmanager
def forced_hub_offline() -> Iterator[None]:
    """Switch huggingface_hub and datasets to offline mode for the enclosed block.

    Both libraries read ``HF_HUB_OFFLINE`` once at import, so setting the variable
    later has no effect; their module flags are flipped instead and restored after.
    In offline mode they serve cached copies and fail at once when there are none.
    """
    import sys

    import huggingface_hub.constants as hub_constants

    saved: list[tuple[Any, str, Any]] = [(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)]
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(datasets_config, attr):
                saved.append((datasets_config, attr, getattr(datasets_config, attr)))
    try:
        for module, attr, _ in saved:
            setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _find_gpt2_dir(spec: str, raw_dir: str) -> Path:
    if not raw_dir:
        raise DataError(f"tokenizer spec {spec!r} names no directory; allowed forms: {SPEC_FORMS}")
    path = Path(raw_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"tokenizer spec {spec!r}: directory {str(path)!r} does not exist; it must hold "
            f"{' and '.join(GPT2_FILES)}. Allowed forms: {SPEC_FORMS}"
        )
    missing = [name for name in GPT2_FILES if not (path / name).is_file()]
    if missing:
        raise DataError(
            f"tokenizer spec {spec!r}: {', '.join(missing)} not found in {str(path)!r} "
            f"(looked for {' and '.join(GPT2_FILES)}). Allowed forms: {SPEC_FORMS}"
        )
    return path.resolve()


def _load_gpt2(spec: str, directory: Path) -> HFTokenizer:
    from transformers import GPT2TokenizerFast

    # from_pretrained on a folder works on transformers 4.x and 5.x alike; on 5.x
    # the constructor ignores vocab_file=/merges_file= and silently builds an empty
    # vocabulary.
    try:
        hf_tok = GPT2TokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"tokenizer spec {spec!r}: cannot read {' and '.join(GPT2_FILES)} in {str(directory)!r}: {exc}"
        ) from exc
    tok = HFTokenizer(hf_tok, name="gpt2", spec=f"gpt2:{directory}")
    if tok.vocab_size <= 256:
        raise DataError(
            f"tokenizer spec {spec!r}: {str(directory)!r} yields only {tok.vocab_size} tokens; "
            f"vocab.json or merges.txt is not a GPT-2 BPE vocabulary"
        )
    return tok


def _load_hub(spec: str, hub_id: str) -> HFTokenizer:
    if not hub_id:
        raise DataError(f"tokenizer spec {spec!r} names no hub id; allowed forms: {SPEC_FORMS}")
    from transformers import AutoTokenizer

    reason = hub_offline_reason()
    try:
        if reason is None:
            hf_tok = AutoTokenizer.from_pretrained(hub_id)
        else:
            with forced_hub_offline():
                hf_tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError) as exc:
        why = f"the hub is unreachable ({reason}) and no cached copy exists" if reason else str(exc)
        raise DataError(
            f"tokenizer {spec!r} cannot be loaded: {why}. Use a local folder with vocab.json and "
            f"merges.txt ('gpt2:<dir>', e.g. gpt2:../shared/data/gpt2-tokenizer) or 'byte'."
        ) from exc
    return HFTokenizer(hf_tok, name=hub_id, spec=f"hf:{hub_id}")


def build_tokenizer(spec: str = "byte") -> Tokenizer:
    """Build the tokenizer that ``spec`` names.

    Args:
        spec: ``"byte"``; ``"gpt2:<dir>"`` or a directory path holding ``vocab.json``
            and ``merges.txt``; or ``"hf:<hub id>"``.

    Returns:
        The tokenizer; its ``spec`` attribute is the canonical form of ``spec``
        (directories resolved to absolute paths).

    Raises:
        DataError: unknown spec, missing directory or files, or a hub tokenizer that
            cannot be fetched; the message names the spec and the allowed forms.
    """
    text = spec.strip()
    if text == "" or text.lower() == "byte":
        return ByteTokenizer()
    if text.startswith("gpt2:"):
        return _load_gpt2(spec, _find_gpt2_dir(spec, text[len("gpt2:") :]))
    if text.startswith("hf:"):
        return _load_hub(spec, text[len("hf:") :].strip())
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_gpt2(spec, _find_gpt2_dir(spec, text))
    if os.sep in text or text.startswith((".", "~")):
        raise DataError(
            f"tokenizer spec {spec!r}: directory {str(path)!r} does not exist; it must hold "
            f"{' and '.join(GPT2_FILES)}. Allowed forms: {SPEC_FORMS}"
        )
    hint = f" To download it from the hub write 'hf:{text}'." if text.lower() == "gpt2" else ""
    raise DataError(f"unknown tokenizer spec {spec!r}. Allowed forms: {SPEC_FORMS}.{hint}")
