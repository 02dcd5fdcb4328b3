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
    PREFIX[.bin|.idx]       a Megatron indexed dataset (PREFIX.bin + PREFIX.idx, e.g. Pythia's preprocessed Pile):
                            the sequences in index order, dtype from the .idx header (`read_indexed`)
    several token files     one stream, in the order given (`TokenStream`: no copy; windows read across files)
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
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mole_jax.config import MoleError

TOKENIZER = "tokenizer.json"  # a run's tokenizer, beside its checkpoints (and the name inside a tokenizer directory)
from mole_jax.corpus import default_documents  # noqa: F401  (data.default_documents, as before)

DEFAULT = "default"
TOKEN_COUNTS = "token_counts.npy"  # RUN_DIR/token_counts.npy: how often each id occurs in the training windows
EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_PIECE_CHARS = 1 << 20  # long files are tokenised in pieces of about this many characters, split at newlines


@dataclasses.dataclass
class Corpus:
    """A token stream and what it came from."""

    tokens: np.ndarray | TokenStream  # 1-D ints (an np.memmap for a token file; a TokenStream for several)
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


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json at `path`: the file itself, or the one inside a directory (a Hugging Face tokenizer
    directory such as GPT-NeoX-20B's, whose tokenizer the authors' released checkpoints use but do not carry)."""
    given = Path(path).expanduser().absolute()
    found = given / TOKENIZER if given.is_dir() else given
    if not found.is_file():
        where = f"{given} holds no {TOKENIZER}" if given.is_dir() else f"{given} does not exist"
        raise MoleError(f"tokenizer not found: {where}")
    return found


def resolve_tokenizer(tokenizer, vocab_size: int | None = None):
    """A `tokenizers.Tokenizer`: as given, or read from a tokenizer.json (or a directory holding one); with
    vocab_size, refused when it has more tokens than the model's vocabulary (its ids would fall outside it)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer_file(tokenizer))
    elif not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "get_vocab_size"):
        raise MoleError(f"tokenizer must be a path or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if vocab_size is not None:
        check_tokenizer(tokenizer, vocab_size)
    return tokenizer


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


# Token files: flat files, Megatron indexed datasets, and several of them as one stream ------------------------
def token_file_dtype(path: Path):
    name = path.name.lower()
    return np.uint32 if name.endswith((".u32.bin", ".uint32.bin")) else np.uint16


class TokenStream:
    """Several 1-D token arrays (memory maps) read as one stream, without copying them into one: `stream[a:b]`
    is an np.ndarray even when the range crosses from one piece into the next, which is all that the windowing
    code (`read_windows`, `token_counts`, `Corpus.tokens.size`) asks of a token stream. The pieces are ranges
    [lo, hi) of `arrays`: whole files, or the runs of back-to-back sequences of an indexed dataset whose .bin
    has gaps. `dtype` is the one that holds every piece's ids (np.result_type)."""

    ndim = 1

    def __init__(self, arrays: Sequence[np.ndarray], source=None, lo=None, hi=None):
        """arrays: 1-D arrays; source, lo, hi: for each piece in stream order, which array and which range of it
        (default: each array whole, in order). Empty pieces are dropped."""
        self.arrays = list(arrays)
        if source is None:
            source, lo, hi = range(len(self.arrays)), [0] * len(self.arrays), [a.size for a in self.arrays]
        source, lo, hi = (np.asarray(x, np.int64).reshape(-1) for x in (source, lo, hi))
        keep = hi > lo
        self.source, self.lo, self.hi = source[keep], lo[keep], hi[keep]
        self.offsets = np.concatenate([[0], np.cumsum(self.hi - self.lo)]).astype(np.int64)  # stream positions
        self.dtype = np.result_type(*[a.dtype for a in self.arrays]) if self.arrays else np.dtype(np.uint16)
        self.size = int(self.offsets[-1])
        self.shape = (self.size,)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"TokenStream({self.size} {self.dtype.name} tokens, {self.lo.size} pieces of {len(self.arrays)} arrays)"

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0,), self.dtype)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while i < self.lo.size and self.offsets[i] < stop:
            shift = int(self.lo[i] - self.offsets[i])
            a, b = max(start, int(self.offsets[i])) + shift, min(stop, int(self.offsets[i + 1])) + shift
            parts.append(np.asarray(self.arrays[int(self.source[i])][a:b]))
            i += 1
        if len(parts) == 1:
            return parts[0].astype(self.dtype, copy=False)  # within one piece: a view when the dtypes agree
        return np.concatenate(parts, dtype=self.dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step == 1:
                return self._range(start, stop)
            idx = np.arange(start, stop, step)
            if not idx.size:
                return self._range(0, 0)
            return self._range(int(idx.min()), int(idx.max()) + 1)[idx - idx.min()]
        if isinstance(key, (int, np.integer)):
            k = int(key) + self.size if key < 0 else int(key)
            if not 0 <= k < self.size:
                raise IndexError(f"index {int(key)} is out of bounds for a stream of {self.size} tokens")
            return self._range(k, k + 1)[0]
        raise TypeError(f"a TokenStream is indexed by an int or a slice, not {type(key).__name__}")

    def __array__(self, dtype=None, copy=None):
        out = self._range(0, self.size)
        return out if dtype is None else out.astype(dtype)


# Megatron's indexed dataset (megatron/core/datasets/indexed_dataset.py): PREFIX.bin holds the tokens of every
# sequence; PREFIX.idx is a 34-byte header, then int32 lengths [S], int64 byte pointers into the .bin [S], int64
# document indices [D] (sequence numbers where documents start, then S), and for multimodal data int8 modes [S].
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}
_IDX_CHUNK = 1 << 22  # index entries checked at a time: the Pile's index is never read whole


@dataclasses.dataclass
class IndexedDataset:
    """A checked Megatron indexed dataset. Its token stream is `base[lo[i]:hi[i]]` for each i in order: the runs
    of sequences that lie back to back in the .bin (one run in the normal case)."""

    bin_path: Path
    idx_path: Path
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int
    base: np.memmap  # the whole .bin
    lo: np.ndarray  # int64 [runs], in tokens
    hi: np.ndarray

    @property
    def tokens(self) -> np.ndarray | TokenStream:
        """The sequences in index order: the .bin's memmap itself (or a slice of it, also a memmap: no copy) when
        they lie back to back, else a TokenStream over the runs."""
        if self.lo.size == 1:
            lo, hi = int(self.lo[0]), int(self.hi[0])
            return self.base if (lo, hi) == (0, self.base.size) else self.base[lo:hi]
        return TokenStream([self.base], np.zeros_like(self.lo), self.lo, self.hi)


def indexed_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(PREFIX.bin, PREFIX.idx)."""
    return Path(str(prefix) + ".bin"), Path(str(prefix) + ".idx")


def read_indexed(prefix: str | Path) -> IndexedDataset:
    """Open PREFIX.bin and PREFIX.idx with np.memmap (neither is read whole) and check the index against the data.
    The dtype is the header's, whatever the names say. Raises MoleError naming the file and what is wrong: a
    missing file, bad magic, an unknown version or dtype code, a float dtype, counts that do not fit the .idx,
    negative lengths, pointers outside the .bin or between two ids, more tokens than the .bin holds, document
    indices out of range or decreasing, no tokens at all."""
    bin_path, idx_path = indexed_paths(prefix)
    for f in (idx_path, bin_path):
        if not f.is_file():
            raise MoleError(f"indexed dataset {prefix}: {f} does not exist")
    idx_size, bin_size = idx_path.stat().st_size, bin_path.stat().st_size

    def bad(what: str) -> MoleError:
        return MoleError(f"indexed dataset index {idx_path} is damaged: {what}")

    with open(idx_path, "rb") as f:
        head = f.read(IDX_HEADER.size)
    if len(head) < IDX_HEADER.size:
        raise bad(f"it has {len(head)} bytes, fewer than the {IDX_HEADER.size}-byte header")
    magic, version, code, n_seq, n_doc = IDX_HEADER.unpack(head)
    if magic != IDX_MAGIC:
        raise bad(f"its magic is {magic!r}, not {IDX_MAGIC!r} (not a Megatron indexed dataset index?)")
    if version != 1:
        raise bad(f"unknown version {version} (known: 1)")
    if code not in IDX_DTYPES:
        raise bad(f"unknown dtype code {code} (known: "
                  + ", ".join(f"{c} {np.dtype(t).name}" for c, t in IDX_DTYPES.items()) + ")")
    dtype = np.dtype(IDX_DTYPES[code])
    if dtype.kind == "f":
        raise MoleError(f"indexed dataset {idx_path} holds {dtype.name} values (dtype code {code}), not token ids")
    need = IDX_HEADER.size + 12 * n_seq + 8 * n_doc
    if idx_size not in (need, need + n_seq):  # + n_seq: the int8 modes of a multimodal dataset
        raise bad(f"its counts ({n_seq} sequences, {n_doc} documents) need {need} bytes ({need + n_seq} with "
                  f"multimodal modes) but it has {idx_size}")

    def table(dt, offset: int, n: int) -> np.ndarray:
        return np.memmap(idx_path, dt, mode="r", offset=offset, shape=(n,)) if n else np.zeros((0,), dt)

    lengths = table(np.int32, IDX_HEADER.size, n_seq)
    pointers = table(np.int64, IDX_HEADER.size + 4 * n_seq, n_seq)
    documents = table(np.int64, IDX_HEADER.size + 12 * n_seq, n_doc)

    item, total, prev_end = dtype.itemsize, 0, None  # prev_end: where the last non-empty sequence ends (tokens)
    runs_lo: list[np.ndarray] = []
    runs_hi: list[np.ndarray] = []
    for a in range(0, n_seq, _IDX_CHUNK):
        n = np.asarray(lengths[a:a + _IDX_CHUNK], np.int64)
        p = np.asarray(pointers[a:a + _IDX_CHUNK], np.int64)
        if (n < 0).any():
            i = int(np.argmax(n < 0))
            raise bad(f"sequence {a + i} has length {int(n[i])}")
        outside = (p < 0) | (p + n * item > bin_size)
        if outside.any():
            i = int(np.argmax(outside))
            raise bad(f"sequence {a + i} (byte pointer {int(p[i])}, {int(n[i])} tokens of {item} bytes) lies "
                      f"outside {bin_path} ({bin_size} bytes)")
        if (p % item).any():
            i = int(np.argmax(p % item != 0))
            raise bad(f"sequence {a + i}'s byte pointer {int(p[i])} is not a multiple of {item} ({dtype.name})")
        total += int(n.sum())
        start = p[n > 0] // item
        end = start + n[n > 0]
        if not start.size:
            continue
        cut = np.flatnonzero(start[1:] != end[:-1]) + 1  # where a sequence does not follow the one before it
        los, his = start[np.concatenate([[0], cut])], end[np.concatenate([cut - 1, [start.size - 1]])]
        if prev_end is not None and los[0] == prev_end:  # the chunk continues the last run
            runs_hi[-1][-1] = his[0]
            los, his = los[1:], his[1:]
        if los.size:
            runs_lo.append(los)
            runs_hi.append(his)
        prev_end = int(end[-1])
    if total * item > bin_size:
        raise bad(f"it counts {total} tokens ({total * item} bytes) but {bin_path} has {bin_size} bytes")
    last = 0
    for a in range(0, n_doc, _IDX_CHUNK):
        d = np.asarray(documents[a:a + _IDX_CHUNK], np.int64)
        outside = (d < 0) | (d > n_seq)
        if outside.any():
            i = int(np.argmax(outside))
            raise bad(f"document index {a + i} is {int(d[i])}, outside [0, {n_seq}] (its sequence count)")
        down = np.diff(np.concatenate([[last if a else d[0]], d])) < 0
        if down.any():
            i = int(np.argmax(down))
            raise bad(f"document indices decrease at entry {a + i} ({int(d[i - 1]) if i else last} -> {int(d[i])})")
        last = int(d[-1])
    if total == 0:
        raise MoleError(f"indexed dataset {idx_path} holds no tokens")
    base = np.memmap(bin_path, dtype, mode="r", shape=(bin_size // item,))
    return IndexedDataset(bin_path, idx_path, dtype, n_seq, n_doc, total, base, np.concatenate(runs_lo),
                          np.concatenate(runs_hi))


def _fingerprint_file(path: Path) -> str:
    """Size and the first and last MiB: enough to notice a different file without reading 100 GB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _token_source(p: Path) -> tuple[str, Path] | None:
    """("flat", FILE.bin) or ("indexed", PREFIX) when `p` names a token source, else None (text, a directory).
    An indexed dataset is named by PREFIX.bin with PREFIX.idx beside it, by PREFIX.idx, or by a PREFIX that is
    not itself a file or directory but has PREFIX.idx."""
    name = str(p)
    if name.endswith(".idx"):
        return "indexed", Path(name[:-4])
    if name.endswith(".bin"):
        return ("indexed", Path(name[:-4])) if Path(name[:-4] + ".idx").is_file() else ("flat", p)
    if not p.exists() and Path(name + ".idx").is_file():
        return "indexed", p
    return None


def _open_token_file(kind: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(array, lo, hi, description): the file's stream is array[lo[i]:hi[i]] for each i."""
    if kind == "indexed":
        ds = read_indexed(path)
        desc = {"path": str(ds.bin_path), "format": "megatron-indexed", "index": str(ds.idx_path),
                "dtype": ds.dtype.name, "num_tokens": ds.num_tokens, "sequences": ds.num_sequences,
                "documents": ds.num_documents,
                "fingerprint": hashlib.sha256((_fingerprint_file(ds.idx_path) + _fingerprint_file(ds.bin_path))
                                              .encode()).hexdigest()[:16]}
        return ds.base, ds.lo, ds.hi, desc
    (path,) = _as_paths(path)
    if not path.is_file():
        raise MoleError(f"token file {path} is not a file")
    dtype = np.dtype(token_file_dtype(path))
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise MoleError(f"token file {path} has {size} bytes, not a whole number of {dtype.name} ids")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    desc = {"path": str(path), "format": "flat", "dtype": dtype.name, "num_tokens": int(tokens.size),
            "fingerprint": _fingerprint_file(path)}
    return tokens, np.array([0]), np.array([tokens.size]), desc


def _token_corpus(sources: Sequence[tuple[str, Path]], tokenizer, tok_source: str) -> Corpus:
    """One token stream from token files in the order given: a single file's memmap, or a TokenStream."""
    opened = [_open_token_file(kind, path) for kind, path in sources]
    files = [desc for *_, desc in opened]
    if len(opened) == 1 and opened[0][1].size == 1:
        array, lo, hi, _ = opened[0]
        tokens = array if (int(lo[0]), int(hi[0])) == (0, array.size) else array[int(lo[0]):int(hi[0])]
    else:
        tokens = TokenStream([o[0] for o in opened], np.concatenate([np.full(o[1].size, i) for i, o in
                                                                        enumerate(opened)]),
                             np.concatenate([o[1] for o in opened]), np.concatenate([o[2] for o in opened]))
    fingerprint = (files[0]["fingerprint"] if len(files) == 1 else
                   hashlib.sha256(",".join(f["fingerprint"] for f in files).encode()).hexdigest()[:16])
    desc = {"kind": "tokens", "paths": [f["path"] for f in files], "dtype": np.dtype(tokens.dtype).name,
            "num_tokens": int(tokens.size), "fingerprint": fingerprint, "files": files,
            "tokenizer": None if tokenizer is None else _tokenizer_desc(tokenizer, tok_source)}
    return Corpus(tokens, desc, tokenizer)


# The corpus ---------------------------------------------------------------------------------------------------
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
    """Whether a `data` argument names token files (.bin files, Megatron indexed datasets), which need no
    tokenizer."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    return any(_token_source(Path(p).expanduser()) is not None for p in items)


def open_corpus(data=None, *, vocab_size: int, tokenizer=None) -> Corpus:
    """Read a data source (see the module docstring) into one token stream.

    data: None / "default", a path, or a list of them (`--data`). Token files given together (flat .bin files and
    Megatron indexed datasets alike) are one stream in the order given.
    tokenizer: a `tokenizers.Tokenizer`, a path to a tokenizer.json, or None: train a byte-level BPE with
    `vocab_size` on the text (a token file needs none). Raises MoleError for a missing or empty source, a damaged
    indexed dataset, token files mixed with text, or a tokenizer larger than `vocab_size` (token ids outside the
    vocabulary are found as windows are read: `read_windows`).
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
        items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        sources = [_token_source(Path(p).expanduser().absolute()) for p in items]
        if items and all(sources):
            return _token_corpus(sources, tokenizer, tok_source)
        if any(sources):
            raise MoleError("give token files (.bin, Megatron indexed datasets) or text, not a mix of both: "
                            + ", ".join(str(p) for p, src in zip(items, sources) if src))
        paths = _as_paths(data)
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
    if out.size and out.dtype.kind == "i" and int(out.min()) < 0:  # signed ids (an indexed dataset's int32)
        raise MoleError(f"token id {int(out.min())} in the data is outside the model's vocabulary [0, {vocab_size})")
    return out.astype(np.int32)


def token_counts(tokens: np.ndarray, vocab_size: int, *, seq_len: int | None = None,
                 exclude_windows: np.ndarray | None = None, chunk: int = 1 << 24) -> np.ndarray:
    """int64 [vocab_size]: how often each id occurs in the token stream, in chunks (a memory-mapped stream is never
    read whole); with seq_len, only in the input positions of the windows that `exclude_windows` (e.g. the
    validation windows) does not name. What a device tier of the most frequent ids is ordered by."""
    stop = tokens.size if seq_len is None else num_windows(tokens.size, seq_len) * seq_len
    counts_V = np.zeros(vocab_size, np.int64)
    def count(ids: np.ndarray) -> np.ndarray:
        if ids.size and ids.dtype.kind == "i" and int(ids.min()) < 0:
            raise MoleError(f"token id {int(ids.min())} in the data is outside the model's vocabulary "
                            f"[0, {vocab_size})")
        return np.bincount(ids, minlength=vocab_size)[:vocab_size]

    for start in range(0, stop, chunk):
        counts_V += count(np.asarray(tokens[start:min(start + chunk, stop)]))
    for w in [] if exclude_windows is None or seq_len is None else exclude_windows.tolist():
        counts_V -= count(np.asarray(tokens[w * seq_len:(w + 1) * seq_len]))
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


