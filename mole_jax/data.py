"""Data: text, token files or a `datasets` dataset in; fixed-length windows out, in an order that is a pure
function of (seed, step), so a resumed run (or another host) sees exactly the same batches.

Sources (`open_corpus(data, ...)`):
    None / "default"        the EMBEDDED DEFAULT corpus: the English documentation the Python installation carries
                            (pydoc_data.topics, the language reference's prose, and the standard library's module,
                            class and function docstrings): real human-written text, no download
    a text file/directory   plain UTF-8 text; a directory contributes every *.txt, *.md, *.rst, *.text file in it
                            (recursively, in sorted order); each file is one document
    tokens.bin              a flat token file (nanoGPT's format) read with np.memmap: uint16, or uint32 when the name
                            ends in .u32.bin / .uint32.bin
    hf:NAME[:CONFIG]        a Hugging Face dataset already in the local cache (never downloads), column "text";
                            a directory written by `Dataset.save_to_disk` works as a plain path
Tokenizer: any tokenizer.json (`load_tokenizer`), or a byte-level BPE trained on the training text with the
model's vocabulary size (`train_tokenizer`). Documents are joined with "<|endoftext|>" when the tokenizer has it.

Split: the token stream is cut into windows of T+1 tokens at stride T (input and shifted target). A fixed,
evenly spread set of windows (`val_fraction` of them) is validation; the rest train. Epoch e visits the training
windows in the order `permutation(seed, e)`, and step s takes the global samples [s*B, (s+1)*B).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mole_jax.config import MoleError
from mole_jax.corpus import default_documents  # noqa: F401  (data.default_documents, as before)

DEFAULT = "default"
TOKEN_COUNTS = "token_counts.npy"  # RUN_DIR/token_counts.npy: how often each id occurs in the training windows
EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_PIECE_CHARS = 1 << 20  # long files are tokenised in pieces of about this many characters, split at newlines


@dataclasses.dataclass
class Corpus:
    """A token stream and what it came from."""

    tokens: np.ndarray  # 1-D unsigned ints (an np.memmap for token files)
    description: dict[str, Any]  # JSON: kind, paths, num_tokens, fingerprint (recorded in run.json)
    tokenizer: Any | None  # tokenizers.Tokenizer, or None for a token file without one


# Text sources -------------------------------------------------------------------------------------------------
def text_files(paths: Sequence[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise MoleError(f"data directory {p} has no text files ({', '.join(TEXT_SUFFIXES)})")
            files += found
        else:
            files.append(p)
    return files


def read_documents(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MoleError(f"cannot read data file {f}: {e}") from None
        yield text


def hf_documents(spec: str) -> tuple[list[str], dict[str, Any]]:
    """`hf:NAME[:CONFIG]` from the local Hugging Face cache, or a `save_to_disk` directory: the "text" column of
    the "train" split. Offline mode is forced while loading: a run never reaches the network."""
    try:
        import datasets
        import huggingface_hub.constants as hub_constants
    except ImportError:
        raise MoleError(f"data {spec!r} needs the `datasets` package: pip install 'mole-jax[datasets]'") from None
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            ds = datasets.load_dataset(name, config or None, split="train")
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise MoleError(f"dataset {spec} has no 'train' split (splits: {list(ds)})")
                ds = ds["train"]
    except MoleError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        raise MoleError(f"cannot load dataset {spec!r} locally: {type(e).__name__}: {e}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    if "text" not in ds.column_names:
        raise MoleError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"]), {"kind": "hf", "paths": [spec], "rows": len(ds)}


def _pieces(docs: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document): long documents cut at newlines so that tokenising never holds a huge string."""
    for doc in docs:
        start = 0
        while len(doc) - start > _PIECE_CHARS:
            cut = doc.rfind("\n", start, start + _PIECE_CHARS) + 1 or start + _PIECE_CHARS
            yield doc[start:cut], False
            start = cut
        yield doc[start:], True


# Tokenizers ---------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path):
    p = Path(path).expanduser()
    if not p.is_file():
        raise MoleError(f"tokenizer file {p} does not exist")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise MoleError(f"unreadable tokenizer {p}: {e}") from None


def train_tokenizer(docs: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2/NeoX style: every byte is a token, so any text encodes) with "<|endoftext|>"."""
    if vocab_size < 257:
        raise MoleError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise MoleError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def tokenize(docs: Iterable[str], tokenizer) -> np.ndarray:
    """Encode documents into one stream, "<|endoftext|>" between documents when the tokenizer has it."""
    eos = tokenizer.token_to_id(EOS)
    dtype = np.uint16 if tokenizer.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.uint32
    out: list[np.ndarray] = []
    batch: list[tuple[str, bool]] = []

    def flush():
        encodings = tokenizer.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        for enc, (_, ends_doc) in zip(encodings, batch):
            ids = enc.ids + [eos] if ends_doc and eos is not None else enc.ids
            out.append(np.asarray(ids, dtype))
        batch.clear()

    for piece in _pieces(docs):
        batch.append(piece)
        if len(batch) == 256:
            flush()
    if batch:
        flush()
    return np.concatenate(out) if out else np.zeros((0,), dtype)


# The corpus ---------------------------------------------------------------------------------------------------
def token_file_dtype(path: Path):
    name = path.name.lower()
    return np.uint32 if name.endswith((".u32.bin", ".uint32.bin")) else np.uint16


def _fingerprint_file(path: Path) -> str:
    """Size and the first and last MiB: enough to notice a different file without reading 100 GB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _as_paths(data) -> list[Path]:
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise MoleError("no data given")
    paths = [Path(p).expanduser().absolute() for p in items]
    for p in paths:
        if not p.exists():
            raise MoleError(f"data path {p} does not exist")
        if p.is_file() and p.stat().st_size == 0:
            raise MoleError(f"data file {p} is empty")
    return paths


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                           or (p / "state.json").is_file())


def recorded_source(desc: dict):
    """The `data` argument of open_corpus that reopens a source described by `Corpus.description` (run.json)."""
    return None if desc["kind"] == DEFAULT else desc["paths"][0] if desc["kind"] == "hf" else desc["paths"]


def is_token_source(data) -> bool:
    """Whether a `data` argument names a token file (.bin), which needs no tokenizer."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    return any(str(p).endswith(".bin") for p in items)


def open_corpus(data=None, *, vocab_size: int, tokenizer=None) -> Corpus:
    """Read a data source (see the module docstring) into one token stream.

    tokenizer: a `tokenizers.Tokenizer`, a path to a tokenizer.json, or None: train a byte-level BPE with
    `vocab_size` on the text (a token file needs none). Raises MoleError for a missing or empty source, a token
    file with ids beyond `vocab_size`, or a tokenizer larger than `vocab_size`.
    """
    tok_source = "given"
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer, tok_source = load_tokenizer(tokenizer), str(Path(tokenizer).expanduser().absolute())
    if tokenizer is not None:
        check_tokenizer(tokenizer, vocab_size)

    if isinstance(data, (list, tuple)) and len(data) == 1:  # the CLI's --data gives a list
        data = data[0]
    if data is None or (isinstance(data, str) and data == DEFAULT):
        docs, desc = default_documents(), {"kind": "default", "paths": []}
    elif isinstance(data, str) and data.startswith("hf:"):
        docs, desc = hf_documents(data)
    else:
        paths = _as_paths(data)
        if any(p.is_file() and p.suffix == ".bin" for p in paths):
            if len(paths) > 1:
                raise MoleError("give one token file (.bin), not a mix or several: concatenate them first")
            return _token_file(paths[0], tokenizer, tok_source)
        if len(paths) == 1 and _is_saved_dataset(paths[0]):
            docs, desc = hf_documents(str(paths[0]))
        else:
            docs, desc = read_documents(text_files(paths)), {"kind": "text", "paths": [str(p) for p in paths]}

    docs = [d for d in docs if d and not d.isspace()]
    if not docs:
        raise MoleError(f"no text in {', '.join(desc['paths']) or 'the data'}")
    if tokenizer is None:
        tokenizer, tok_source = train_tokenizer(docs, vocab_size), "trained-bpe"
        check_tokenizer(tokenizer, vocab_size)
    tokens = tokenize(docs, tokenizer)
    desc.update(num_tokens=int(tokens.size), fingerprint=hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
                tokenizer=_tokenizer_desc(tokenizer, tok_source))
    return Corpus(tokens, desc, tokenizer)


def _tokenizer_desc(tokenizer, source: str) -> dict[str, Any]:
    return {"source": source, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "fingerprint": tokenizer_fingerprint(tokenizer)}


def _token_file(path: Path, tokenizer, tok_source: str) -> Corpus:
    dtype = token_file_dtype(path)
    size = path.stat().st_size
    if size % np.dtype(dtype).itemsize:
        raise MoleError(f"token file {path} has {size} bytes, not a whole number of {np.dtype(dtype).name} ids")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    desc = {"kind": "tokens", "paths": [str(path)], "dtype": np.dtype(dtype).name, "num_tokens": int(tokens.size),
            "fingerprint": _fingerprint_file(path),
            "tokenizer": None if tokenizer is None else _tokenizer_desc(tokenizer, tok_source)}
    return Corpus(tokens, desc, tokenizer)


# Windows, split and batches -----------------------------------------------------------------------------------
def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len (the last token of one is the first of the next)."""
    return max(0, (num_tokens - 1) // seq_len)


def split_windows(num_tokens: int, seq_len: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) window indices: round(W * val_fraction) windows (at least one when the fraction is
    positive), evenly spread over the stream so that validation samples every part of it."""
    if not 0.0 <= val_fraction < 1.0:
        raise MoleError(f"val_fraction must be in [0, 1), got {val_fraction}")
    W = num_windows(num_tokens, seq_len)
    n_val = 0 if val_fraction == 0 else max(1, round(W * val_fraction))
    if W - n_val < 1:
        raise MoleError(f"the data has {num_tokens} tokens: too few for one training window of {seq_len + 1} "
                        f"tokens plus {n_val} validation window(s)")
    val = ((np.arange(n_val) + 0.5) * W / n_val).astype(np.int64) if n_val else np.zeros((0,), np.int64)
    return np.delete(np.arange(W, dtype=np.int64), val), val


def windows_for_split(num_tokens: int, seq_len: int, val_fraction: float, split: str) -> np.ndarray:
    if split == "all":
        return np.arange(num_windows(num_tokens, seq_len), dtype=np.int64)
    if split not in ("train", "val"):
        raise MoleError(f"split must be train, val or all, got {split!r}")
    train, val = split_windows(num_tokens, seq_len, val_fraction)
    if split == "val" and not val.size:
        raise MoleError("the run has no validation split (val_fraction 0): use --split train or all")
    return train if split == "train" else val


def read_windows(tokens: np.ndarray, windows: np.ndarray, seq_len: int, vocab_size: int) -> np.ndarray:
    """[len(windows), seq_len + 1] int32 token windows, checked against the vocabulary."""
    out = np.stack([np.asarray(tokens[w * seq_len:w * seq_len + seq_len + 1]) for w in windows.tolist()])
    if out.size and int(out.max()) >= vocab_size:
        raise MoleError(f"token id {int(out.max())} in the data is outside the model's vocabulary [0, {vocab_size})")
    return out.astype(np.int32)


def token_counts(tokens: np.ndarray, vocab_size: int, *, seq_len: int | None = None,
                 exclude_windows: np.ndarray | None = None, chunk: int = 1 << 24) -> np.ndarray:
    """int64 [vocab_size]: how often each id occurs in the token stream, in chunks (a memory-mapped stream is never
    read whole); with seq_len, only in the input positions of the windows that `exclude_windows` (e.g. the
    validation windows) does not name. What a device tier of the most frequent ids is ordered by."""
    stop = tokens.size if seq_len is None else num_windows(tokens.size, seq_len) * seq_len
    counts_V = np.zeros(vocab_size, np.int64)
    for start in range(0, stop, chunk):
        counts_V += np.bincount(np.asarray(tokens[start:min(start + chunk, stop)]), minlength=vocab_size)[:vocab_size]
    for w in [] if exclude_windows is None or seq_len is None else exclude_windows.tolist():
        counts_V -= np.bincount(np.asarray(tokens[w * seq_len:(w + 1) * seq_len]), minlength=vocab_size)[:vocab_size]
    return counts_V


class Batches:
    """Training batches: `batch(step, rows)` is a pure function of (seed, step) and the row indices, so any
    process can build just its own rows of the global batch and a resumed run repeats the same order."""

    def __init__(self, tokens: np.ndarray, train_windows: np.ndarray, *, seq_len: int, batch_size: int,
                 seed: int, vocab_size: int):
        self.tokens, self.windows = tokens, train_windows
        self.seq_len, self.batch_size, self.seed, self.vocab_size = seq_len, batch_size, seed, vocab_size
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.windows.size)
        return self._orders[epoch]

    def window_ids(self, step: int, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.arange(self.batch_size) if rows is None else np.asarray(rows)
        sample = step * self.batch_size + rows
        epoch, pos = np.divmod(sample, self.windows.size)
        out = np.empty_like(sample)
        for e in np.unique(epoch):
            out[epoch == e] = self.windows[self._order(int(e))[pos[epoch == e]]]
        return out

    def batch(self, step: int, rows: np.ndarray | None = None) -> np.ndarray:
        """[len(rows), seq_len + 1] int32; rows default to the whole global batch."""
        return read_windows(self.tokens, self.window_ids(step, rows), self.seq_len, self.vocab_size)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.windows.size


