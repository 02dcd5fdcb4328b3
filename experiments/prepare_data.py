"""Tokenise a large corpus into a flat token file (nanoGPT's .bin: uint16, or uint32 for a name ending .u32.bin)
that `mole-jax train --data X.bin` and the experiment scripts memory-map: the paper's data preparation.

Documents stream through the tokenizer in batches and are appended to the file, each followed by "<|endoftext|>"
when the tokenizer has it, so memory stays bounded for the Pile's hundreds of GB. The file is written under a
temporary name and renamed when complete: an interrupted run leaves no file that looks finished.

    # the deduplicated Pile from the Hugging Face hub (the paper's data), GPT-NeoX-20B's tokenizer, 100 B tokens:
    python experiments/prepare_data.py hf:EleutherAI/the_pile_deduplicated --allow-download \\
        --tokenizer gpt-neox-20b/tokenizer.json --out data/pile_dedup.bin --max-tokens 105000000000
    # the Pile's original shards (.jsonl.zst, {"text": ...} per line; needs `pip install zstandard`):
    python experiments/prepare_data.py pile/train/*.jsonl.zst --tokenizer gpt-neox-20b/tokenizer.json --out pile.bin
    # any local dataset (save_to_disk directory), JSON lines, or text files and directories:
    python experiments/prepare_data.py my_dataset/ notes.jsonl book.txt --tokenizer tok.json --out mine.bin

Sources: hf:NAME[:CONFIG] (the split given by --split, from the local cache unless --allow-download), a directory
written by `datasets.Dataset.save_to_disk`, .jsonl / .jsonl.zst files (the --text-field of each line), and text
files or directories (*.txt, *.md, *.rst, *.text; one document per file).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from mole_jax import data
from mole_jax.config import MoleError

BATCH_DOCS = 1024  # documents per tokenizer call (the Rust tokenizer parallelises within a batch)


def documents(sources: list[str], *, text_field: str = "text", split: str = "train",
              allow_download: bool = False) -> Iterator[str]:
    """Every document of the sources, in order."""
    for src in sources:
        if src.startswith("hf:"):
            yield from _hf_documents(src, text_field, split, allow_download)
            continue
        p = Path(src).expanduser()
        if not p.exists():
            raise MoleError(f"data path {p} does not exist")
        if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            yield from _hf_documents(str(p), text_field, split, allow_download)
        elif p.name.endswith((".jsonl", ".jsonl.zst", ".json.zst")):
            yield from _jsonl_documents(p, text_field)
        else:
            yield from data.read_documents(data.text_files([p]))


def _hf_documents(spec: str, text_field: str, split: str, allow_download: bool) -> Iterator[str]:
    try:
        import datasets
        import huggingface_hub.constants as hub_constants
    except ImportError:
        raise MoleError(f"{spec} needs the `datasets` package: pip install 'mole-jax[datasets]'") from None
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if not allow_download:  # the local cache only, unless asked
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise MoleError(f"dataset {spec} has no split {split!r} (splits: {list(ds)})")
                ds = ds[split]
    except MoleError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        hint = "" if allow_download else " (only the local cache is read: pass --allow-download to fetch it)"
        raise MoleError(f"cannot load dataset {spec!r}: {type(e).__name__}: {e}{hint}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    if text_field not in ds.column_names:
        raise MoleError(f"dataset {spec!r} has no {text_field!r} column (columns: {ds.column_names})")
    for batch in ds.select_columns([text_field]).iter(batch_size=BATCH_DOCS):
        yield from batch[text_field]


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise MoleError(f"{path} is zstd-compressed: pip install zstandard") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        lines = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    else:
        lines = open(path, encoding="utf-8", errors="replace")
    with lines:
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MoleError(f"{path}:{i} is not a JSON object with a {text_field!r} field") from None


def write_tokens(docs: Iterator[str], tokenizer, out: Path, *, max_tokens: int | None = None,
                 progress: bool = True) -> dict:
    """Tokenise `docs` into `out` (appending EOS after each document when the tokenizer has it); at most
    `max_tokens`. Returns {"tokens", "documents", "path"}."""
    dtype = data.token_file_dtype(out)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > np.iinfo(dtype).max + 1:
        raise MoleError(f"the tokenizer has {vocab:,} tokens, more than {np.dtype(dtype).name} holds: name the output "
                        f"*.u32.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    written = n_docs = 0
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc=out.name)
    try:
        with open(tmp, "wb") as f:
            for ids in _document_tokens(docs, tokenizer, dtype):
                if max_tokens is not None:
                    ids = ids[:max_tokens - written]
                ids.tofile(f)
                written += ids.size
                n_docs += 1
                bar.update(ids.size)
                if max_tokens is not None and written >= max_tokens:
                    break
        if not written:
            raise MoleError("the sources hold no text")
        tmp.replace(out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return {"tokens": written, "documents": n_docs, "path": str(out)}


def _document_tokens(docs: Iterator[str], tokenizer, dtype) -> Iterator[np.ndarray]:
    """Each non-blank document's token ids, EOS appended when the tokenizer has it, encoded BATCH_DOCS at a time."""
    eos = tokenizer.token_to_id(data.EOS)
    for batch in _batches(docs):
        for enc in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            yield np.asarray(enc.ids + ([eos] if eos is not None else []), dtype)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        if not doc or doc.isspace():
            continue
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="experiments/prepare_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="hf:NAME[:CONFIG], a save_to_disk directory, .jsonl(.zst) files, text")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (the paper: GPT-NeoX-20B's)")
    p.add_argument("--out", required=True, help="token file to write (.bin: uint16; .u32.bin: uint32)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--text-field", default="text", help="the text column / JSON field (text)")
    p.add_argument("--split", default="train", help="dataset split (train)")
    p.add_argument("--allow-download", action="store_true",
                   help="let `datasets` download hf:NAME (default: the local cache only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        out = Path(args.out).expanduser().absolute()
        if not out.name.endswith(".bin"):
            raise MoleError(f"--out must name a .bin token file, got {out.name}")
        if out.exists() and not args.overwrite:
            raise MoleError(f"{out} exists: pass --overwrite to replace it")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise MoleError(f"--max-tokens must be positive, got {args.max_tokens}")
        tokenizer = data.load_tokenizer(args.tokenizer)
        docs = documents(args.sources, text_field=args.text_field, split=args.split,
                         allow_download=args.allow_download)
        r = write_tokens(docs, tokenizer, out, max_tokens=args.max_tokens,
                         progress=not args.no_progress and sys.stderr.isatty())
    except MoleError as e:
        print(f"{p.prog}: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"wrote {r['tokens']:,} tokens of {r['documents']:,} documents to {r['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
