"""Text corpora for the bench: find the files, split them, tokenize, cache the token streams.

The flow is ``resolve_source(--data)`` (cheap: finds files, checks they exist and
are not empty, computes a cache key from paths, sizes and modification times)
then ``load_corpus(source, ...)`` (reads, splits, tokenizes; the token streams
and a trained BPE are cached on disk under the key, so a second run reads two
``.npy`` files and does not tokenize again).

Default corpus: the ``.py`` sources of the running interpreter's standard
library (no download). Test folders and ``site-packages`` are left out; files
are taken in a fixed pseudo-random order (sorted by a hash of their relative
path, so the sample mixes packages instead of taking ``a*``-``e*``) up to
:data:`DEFAULT_MAX_BYTES`. The corpus therefore depends on the Python version,
which the report records.

Held-out split: the concatenated text is cut into ``n`` chunks of about equal
size (cut at newlines; ``10 <= n <= 200``, about 16 KiB each); every
``round(1 / val_fraction)``-th chunk is held out. Interleaving keeps train and
held-out text from the same mix of sources, and the split does not depend on
the tokenizer, so byte and BPE runs hold out the same text. A BPE tokenizer is
trained on the training chunks only.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BenchInputError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Corpus",
    "DataSource",
    "default_cache_dir",
    "eval_windows",
    "get_batch",
    "load_corpus",
    "resolve_source",
    "train_batches",
]

log = logging.getLogger(__name__)

#: byte cap of the default (standard library) corpus; keeps the default run fast
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
_FORMAT = 2  # bump when the cached layout or the split changes
_CHUNK_TARGET = 16 * 1024
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib"}
TOKENIZERS = ("byte", "bpe")


def default_cache_dir() -> Path:
    """``$BLOCKOPT_CACHE``, else ``$XDG_CACHE_HOME/blockopt``, else ``~/.cache/blockopt``."""
    if os.environ.get("BLOCKOPT_CACHE"):
        return Path(os.environ["BLOCKOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blockopt"


@dataclass(frozen=True)
class DataSource:
    """Which files make the corpus, before anything is read.

    ``key`` identifies the files (paths, sizes, modification times) and the byte cap;
    it is part of the sweep's identity and of the token cache's key.
    """

    description: str
    files: tuple[Path, ...]
    total_bytes: int  # of the files, before the cap
    max_bytes: int | None
    key: str
    default: bool = False

    @property
    def used_bytes(self) -> int:
        return self.total_bytes if self.max_bytes is None else min(self.total_bytes, self.max_bytes)

    def to_dict(self) -> dict:
        return {
            "description": self.description,
            "files": len(self.files),
            "total_bytes": self.total_bytes,
            "max_bytes": self.max_bytes,
            "used_bytes": self.used_bytes,
            "key": self.key,
            "default": self.default,
        }


@dataclass(frozen=True)
class Corpus:
    """Token streams of one source, split and tokenized. ``train``/``val`` are 1-D integer arrays."""

    source: DataSource
    tokenizer: str
    vocab_size: int
    train: np.ndarray
    val: np.ndarray
    train_bytes: int
    val_bytes: int
    cache_path: Path
    from_cache: bool
    chunks: int = 0
    val_chunks: int = 0

    def to_dict(self) -> dict:
        return {
            **self.source.to_dict(),
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "train_tokens": int(self.train.size),
            "val_tokens": int(self.val.size),
            "train_bytes": self.train_bytes,
            "val_bytes": self.val_bytes,
            "chunks": self.chunks,
            "val_chunks": self.val_chunks,
            "cache_path": str(self.cache_path),
        }


# --- finding files ---------------------------------------------------------------
def _stdlib_root() -> Path:
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return Path(root)


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel[:-1]):
            continue
        if p.is_file():
            files.append(p)
    # a fixed, well-mixed order: by a hash of the relative path
    files.sort(key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())
    return files


def _is_text_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    return b"\0" not in head


def _folder_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append(Path(dirpath) / name)
    return [p for p in out if p.is_file() and _is_text_file(p)]


def resolve_source(data: str | os.PathLike | None, max_bytes: int | None = None) -> DataSource:
    """Find the files of ``--data`` (a text file, a folder, or a glob; ``None``: the stdlib sources).

    ``max_bytes`` caps the bytes read (``None``: :data:`DEFAULT_MAX_BYTES` for the
    default corpus, no cap otherwise). Raises :class:`BenchInputError` for a path
    that does not exist, a glob that matches no file, or a corpus with no bytes.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise BenchInputError(f"--max-data-bytes: {max_bytes}; expected a positive number of bytes")
    default = data is None
    if default:
        root = _stdlib_root()
        files = _stdlib_files(root)
        description = f"Python {'.'.join(map(str, _py_version()))} standard library sources ({root})"
        if max_bytes is None:
            max_bytes = DEFAULT_MAX_BYTES
        if not files:
            raise BenchInputError(
                f"--data: not given, and the default corpus (the standard library at {root}) has no .py files; "
                "pass --data PATH (a text file, a folder, or a glob)"
            )
    else:
        spec = os.fspath(data)
        if not spec.strip():
            raise BenchInputError("--data: empty path; expected a text file, a folder, or a glob")
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
            description = str(path)
        elif path.is_dir():
            files = _folder_files(path)
            description = f"{path}/ ({len(files)} text files)"
            if not files:
                raise BenchInputError(f"--data: the folder {spec!r} holds no text files")
        elif any(c in spec for c in "*?["):
            matches = sorted(_glob.glob(os.path.expanduser(spec), recursive=True))
            files = [Path(m) for m in matches if os.path.isfile(m)]
            description = f"{spec} ({len(files)} files)"
            if not files:
                raise BenchInputError(f"--data: the glob {spec!r} matches no files")
        else:
            raise BenchInputError(
                f"--data: no such file or folder: {spec!r}; expected a text file, a folder, or a glob"
            )
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    total = sum(s[1] for s in stats)
    if total == 0:
        raise BenchInputError(f"--data: {description} is empty (0 bytes)")
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "files": stats, "max_bytes": max_bytes}).encode())
    return DataSource(description, tuple(files), total, max_bytes, h.hexdigest()[:16], default)


def _py_version() -> tuple[int, int, int]:
    import sys

    return tuple(sys.version_info[:3])  # type: ignore[return-value]


# --- reading and splitting ---------------------------------------------------------
def _read_bytes(source: DataSource) -> bytes:
    parts, n = [], 0
    cap = source.max_bytes
    for p in source.files:
        b = p.read_bytes()
        if b and not b.endswith(b"\n"):
            b += b"\n"
        parts.append(b)
        n += len(b)
        if cap is not None and n >= cap:
            break
    data = b"".join(parts)
    if cap is not None and len(data) > cap:
        cut = data.rfind(b"\n", 0, cap)
        data = data[: cut + 1 if cut > 0 else cap]
    return data


def split_chunks(data: bytes, val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    """Cut ``data`` into chunks at newlines and deal every ``round(1/val_fraction)``-th to held-out."""
    every = max(2, round(1 / val_fraction))
    n_chunks = min(200, max(10, len(data) // _CHUNK_TARGET))
    size = max(1, len(data) // n_chunks)
    chunks, start = [], 0
    for i in range(1, n_chunks):
        target = i * size
        if target <= start:
            continue
        nl = data.find(b"\n", target)
        cut = nl + 1 if 0 <= nl < target + size // 2 else target
        chunks.append(data[start:cut])
        start = cut
    chunks.append(data[start:])
    chunks = [c for c in chunks if c]
    train, val = [], []
    for i, c in enumerate(chunks):
        (val if i % every == every // 2 else train).append(c)
    if not val and len(train) > 1:  # very short corpus: hold out the middle chunk
        val.append(train.pop(len(train) // 2))
    return train, val


# --- tokenizing --------------------------------------------------------------------
def _train_bpe(train_chunks: list[bytes], vocab_size: int):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise BenchInputError(
            "--tokenizer bpe needs the package 'tokenizers': pip install 'blockopt[bench]'"
        ) from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator((c.decode("utf-8", errors="replace") for c in train_chunks), trainer=trainer)
    return tok


def _encode_bpe(tok, chunks: list[bytes]) -> np.ndarray:
    texts = [c.decode("utf-8", errors="replace") for c in chunks]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16 if tok.get_vocab_size() <= 65536 else np.int32)


def _encode_bytes(chunks: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.uint16)


def load_corpus(
    source: DataSource,
    *,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """Read, split and tokenize ``source``; token streams (and a BPE) are cached under ``cache_dir``."""
    if tokenizer not in TOKENIZERS:
        raise BenchInputError(f"--tokenizer: {tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")
    if not 0.0 < val_fraction <= 0.5:
        raise BenchInputError(f"--val-fraction: {val_fraction}; expected a number in (0, 0.5]")
    if tokenizer == "byte":
        vocab_size = 256
    elif vocab_size is None:
        vocab_size = 4096
    elif vocab_size < 257:
        raise BenchInputError(f"--vocab-size: {vocab_size}; a BPE needs at least 257 tokens (256 bytes + merges)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        json.dumps([source.key, tokenizer, vocab_size, val_fraction, _FORMAT]).encode()
    ).hexdigest()[:16]
    path = cache / "tokens" / key
    meta_path = path / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            train = np.load(path / "train.npy", mmap_mode="r")
            val = np.load(path / "val.npy", mmap_mode="r")
            log.info("token streams from cache %s", path)
            return Corpus(source, tokenizer, int(meta["vocab_size"]), train, val, int(meta["train_bytes"]),
                          int(meta["val_bytes"]), path, True, int(meta["chunks"]), int(meta["val_chunks"]))
        except (OSError, ValueError, KeyError) as e:  # a damaged entry: rebuild it
            log.warning("ignoring damaged token cache %s (%s)", path, e)
    data = _read_bytes(source)
    train_chunks, val_chunks = split_chunks(data, val_fraction)
    tok_json = None
    if tokenizer == "bpe":
        tok = _train_bpe(train_chunks, vocab_size)
        train, val = _encode_bpe(tok, train_chunks), _encode_bpe(tok, val_chunks)
        vocab_size = tok.get_vocab_size()
        tok_json = tok.to_str()
    else:
        train, val = _encode_bytes(train_chunks), _encode_bytes(val_chunks)
    meta = {
        "format": _FORMAT,
        "source": source.to_dict(),
        "tokenizer": tokenizer,
        "vocab_size": int(vocab_size),
        "val_fraction": val_fraction,
        "train_bytes": sum(map(len, train_chunks)),
        "val_bytes": sum(map(len, val_chunks)),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "chunks": len(train_chunks) + len(val_chunks),
        "val_chunks": len(val_chunks),
    }
    _write_cache(path, train, val, meta, tok_json)
    log.info("tokenized %s: %d train / %d held-out tokens -> %s", source.description, train.size, val.size, path)
    return Corpus(source, tokenizer, int(vocab_size), train, val, meta["train_bytes"], meta["val_bytes"], path, False,
                  meta["chunks"], meta["val_chunks"])


def _write_cache(path: Path, train: np.ndarray, val: np.ndarray, meta: dict, tok_json: str | None) -> None:
    """Write the entry into a temporary folder and rename it into place (atomic for readers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        if tok_json is not None:
            (tmp / "tokenizer.json").write_text(tok_json)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "meta.json").is_file():  # another process may have won the race
            raise


# --- batches -----------------------------------------------------------------------
def _check_len(n: int, context: int, split: str) -> None:
    if n < context + 2:
        raise BenchInputError(
            f"--context: {context} is too long for the {split} split of this corpus ({n} tokens); "
            f"use a shorter --context or more --data"
        )


def train_batches(n_tokens: int, steps: int, batch_size: int, context: int, seed: int) -> np.ndarray:
    """Start offsets ``[steps, batch_size]`` of training windows: a function of ``seed`` only,
    so every optimizer sees the same batches in the same order (and a resumed run too)."""
    _check_len(n_tokens, context, "training")
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, n_tokens - context - 1, size=(steps, batch_size), dtype=np.int64)


def eval_windows(n_tokens: int, n_windows: int, context: int) -> np.ndarray:
    """Start offsets of the held-out windows: evenly spread, the same for every run."""
    _check_len(n_tokens, context, "held-out")
    n = max(1, min(n_windows, (n_tokens - 1) // context))
    return np.linspace(0, n_tokens - context - 1, n).astype(np.int64)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, context: int):
    """``(x, y)`` int64 tensors ``[len(offsets), context]``; ``y`` is ``x`` shifted by one."""
    import torch

    idx = np.asarray(offsets)[:, None] + np.arange(context + 1)[None, :]
    arr = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # [B, T+1]
    return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()

