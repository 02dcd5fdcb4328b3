"""Token files read as one stream: Megatron indexed datasets (the Pythia Pile's format: PREFIX.bin + PREFIX.idx)
and several token files given together. Every index here is written byte by byte from the documented layout
(no Megatron import): 9-byte magic, <Q version 1, <B dtype code, <Q sequence count, <Q document count, int32
lengths, int64 byte pointers, int64 document indices."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from mole_jax import checkpoint, data
from mole_jax.config import MoleError

V = 512  # tiny-mole's vocabulary
SEQ = 32
CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.uint32): 4}  # uint32 ids fit int32 here


def write_indexed(prefix: Path, seqs, dtype, *, docs=None, scatter: bool = False, header: dict | None = None,
                  idx_tail: int = 0) -> tuple[Path, Path]:
    """PREFIX.bin / PREFIX.idx holding `seqs` (lists of ids) in index order. scatter: the .bin stores them in
    reverse order with junk ids (outside any vocabulary) between them, so only the pointers find them. header:
    fields of the header to override (magic, version, code, n_seq, n_doc). idx_tail: bytes cut (< 0) or added."""
    dtype = np.dtype(dtype)
    seqs = [np.asarray(s, dtype) for s in seqs]
    junk = np.full(3, 60000 if dtype == np.uint16 else -7, dtype)
    blob, pointers = b"", [0] * len(seqs)
    order = range(len(seqs) - 1, -1, -1) if scatter else range(len(seqs))
    for i in order:
        if scatter:
            blob += junk.tobytes()
        pointers[i] = len(blob)
        blob += seqs[i].tobytes()
    if scatter:
        blob += junk.tobytes()
    docs = list(range(len(seqs) + 1)) if docs is None else docs  # one document per sequence (Megatron's [0..S])
    h = {"magic": data.IDX_MAGIC, "version": 1, "code": CODES[dtype], "n_seq": len(seqs), "n_doc": len(docs),
         **(header or {})}
    idx = (struct.pack("<9sQBQQ", h["magic"], h["version"], h["code"], h["n_seq"], h["n_doc"])
           + np.array([s.size for s in seqs], "<i4").tobytes() + np.array(pointers, "<i8").tobytes()
           + np.array(docs, "<i8").tobytes())
    idx = idx[:len(idx) + idx_tail] if idx_tail < 0 else idx + b"\x00" * idx_tail
    bin_path, idx_path = data.indexed_paths(prefix)
    bin_path.write_bytes(blob)
    idx_path.write_bytes(idx)
    return bin_path, idx_path


def cut(tokens: np.ndarray, sizes) -> list[np.ndarray]:
    """`tokens` split into sequences of these sizes, repeated (the last sequence takes the rest)."""
    out, start, i = [], 0, 0
    while start < tokens.size:
        n = sizes[i % len(sizes)]
        out.append(tokens[start:start + n])
        start, i = start + n, i + 1
    return out


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """5,003 random ids below V as one flat file, and the same tokens in the other forms."""
    root = tmp_path_factory.mktemp("tokens")
    tokens = np.random.default_rng(0).integers(0, V, 5003).astype(np.uint16)
    tokens.tofile(root / "all.bin")
    half = 2501  # not a multiple of SEQ: some windows cross from one file into the next
    tokens[:half].tofile(root / "a.bin")
    tokens[half:].tofile(root / "b.bin")
    seqs = cut(tokens, [7, 0, 130, 1, 64])  # an empty sequence too
    write_indexed(root / "u16.u32", seqs, np.uint16, docs=[0, 2, 2, 5, len(seqs)])  # name says u32, header uint16
    write_indexed(root / "i32", seqs, np.int32)
    write_indexed(root / "scattered", seqs, np.uint16, scatter=True)
    write_indexed(root / "first", cut(tokens[:half], [100]), np.int32)
    return root, tokens


def test_indexed_dataset_by_prefix_bin_or_idx(stream):
    """Each way of naming the dataset reads its sequences in index order with the header's dtype, whatever the name
    says; sequences back to back in the .bin give the .bin's memmap itself (no copy)."""
    root, tokens = stream
    for prefix, dtype in (("u16.u32", np.uint16), ("i32", np.int32)):
        for name in (prefix, prefix + ".bin", prefix + ".idx", [str(root / prefix)]):
            given = [str(root / n) for n in name] if isinstance(name, list) else root / name
            assert data.is_token_source(given)
            corpus = data.open_corpus(given, vocab_size=V)
            assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == dtype, (name, corpus.tokens)
            assert Path(corpus.tokens.filename) == root / (prefix + ".bin") and corpus.tokenizer is None
            np.testing.assert_array_equal(corpus.tokens, tokens)
            desc = corpus.description
            assert desc["kind"] == "tokens" and desc["num_tokens"] == tokens.size
            assert desc["paths"] == [str(root / (prefix + ".bin"))] and desc["dtype"] == np.dtype(dtype).name
            (f,) = desc["files"]
            assert f["format"] == "megatron-indexed" and f["sequences"] == len(cut(tokens, [7, 0, 130, 1, 64]))
            assert data.open_corpus(data.recorded_source(desc), vocab_size=V).description == desc
    ds = data.read_indexed(root / "u16.u32")
    assert (ds.dtype, ds.num_documents, ds.num_tokens) == (np.uint16, 5, tokens.size)
    assert not data.is_token_source(root / "missing")  # a prefix without PREFIX.idx is a (missing) text path


def test_scattered_sequences_read_by_their_pointers(stream):
    """A .bin whose sequences are in another order, with junk between them, reads by the pointers and lengths:
    a TokenStream over the runs, sliced like an array across runs."""
    root, tokens = stream
    s = data.open_corpus(root / "scattered", vocab_size=V).tokens
    assert isinstance(s, data.TokenStream) and s.size == len(s) == tokens.size and s.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(s), tokens)
    rng = np.random.default_rng(1)
    for a, b in rng.integers(0, tokens.size + 5, (200, 2)):
        np.testing.assert_array_equal(s[a:b], tokens[a:b])
    np.testing.assert_array_equal(s[5:300:7], tokens[5:300:7])
    np.testing.assert_array_equal(s[-10:], tokens[-10:])
    assert s[0] == tokens[0] and s[-1] == tokens[-1] and s[137] == tokens[137]
    with pytest.raises(IndexError):
        s[tokens.size]


def test_index_checked_in_chunks(stream, monkeypatch):
    """The index is read a chunk of entries at a time (the Pile's is GBs): runs of back-to-back sequences join
    across chunks, so a chunked read gives the same stream (the memmap itself for a contiguous .bin)."""
    root, tokens = stream
    monkeypatch.setattr(data, "_IDX_CHUNK", 3)
    whole = data.read_indexed(root / "i32")
    assert whole.lo.tolist() == [0] and whole.hi.tolist() == [tokens.size] and whole.tokens is whole.base
    scattered = data.read_indexed(root / "scattered")
    assert scattered.lo.size == 100  # 125 sequences, 25 of them empty: each other one is a run of its own
    np.testing.assert_array_equal(np.asarray(scattered.tokens), tokens)


SOURCES = {  # the same tokens as all.bin, in other forms
    "indexed uint16": ["u16.u32"],
    "indexed int32": ["i32.bin"],
    "two files": ["a.bin", "b.bin"],
    "indexed + file": ["first.idx", "b.bin"],
    "scattered": ["scattered"],
}


def test_same_batches_as_one_flat_file(stream):
    """Every form of the stream gives the flat file's windows (those that cross a file boundary included),
    batches for the same steps, token counts and split; each records its own fingerprint."""
    root, tokens = stream
    flat = data.open_corpus(root / "all.bin", vocab_size=V)
    train_w, val_w = data.split_windows(flat.tokens.size, SEQ, 0.05)
    want = data.Batches(flat.tokens, train_w, seq_len=SEQ, batch_size=8, seed=3, vocab_size=V)
    want_counts = data.token_counts(flat.tokens, V, seq_len=SEQ, exclude_windows=val_w)
    every = np.arange(data.num_windows(tokens.size, SEQ))  # window 78 crosses a.bin -> b.bin (token 2501)
    fingerprints = {flat.description["fingerprint"]}
    for name, files in SOURCES.items():
        corpus = data.open_corpus([str(root / f) for f in files], vocab_size=V)
        assert corpus.tokens.size == tokens.size, name
        np.testing.assert_array_equal(data.read_windows(corpus.tokens, every, SEQ, V),
                                      data.read_windows(flat.tokens, every, SEQ, V), err_msg=name)
        got_train, got_val = data.split_windows(corpus.tokens.size, SEQ, 0.05)
        np.testing.assert_array_equal(got_train, train_w)
        got = data.Batches(corpus.tokens, got_train, seq_len=SEQ, batch_size=8, seed=3, vocab_size=V)
        for step in (0, 1, 7, 18, 19, 40):  # 18 steps per epoch: 18 and 19 cross into the next
            np.testing.assert_array_equal(got.batch(step), want.batch(step), err_msg=f"{name} step {step}")
        np.testing.assert_array_equal(data.token_counts(corpus.tokens, V, seq_len=SEQ, exclude_windows=got_val,
                                                        chunk=1000), want_counts, err_msg=name)
        desc = corpus.description
        assert len(desc["files"]) == len(files) and desc["num_tokens"] == tokens.size
        assert desc["fingerprint"] not in fingerprints, name
        fingerprints.add(desc["fingerprint"])
    assert data.open_corpus([str(root / "b.bin"), str(root / "a.bin")],  # another order, another stream
                            vocab_size=V).description["fingerprint"] not in fingerprints


def test_ids_are_checked_against_the_vocabulary(tmp_path):
    """As for a flat file: ids at or above the vocabulary, and (signed dtypes) below 0, stop the read."""
    ids = np.random.default_rng(2).integers(0, 100, 400).astype(np.int32)
    ids[150] = -3
    write_indexed(tmp_path / "neg", [ids[:200], ids[200:]], np.int32)
    np.arange(400, dtype=np.uint16).tofile(tmp_path / "big.bin")
    tokens = data.open_corpus([tmp_path / "neg", tmp_path / "big.bin"], vocab_size=300).tokens
    assert tokens.dtype == np.int32
    for w, msg in ((150 // SEQ, "token id -3 "), (700 // SEQ, "token id 3")):
        with pytest.raises(MoleError, match=msg + r".*outside the model's vocabulary \[0, 300\)"):
            data.read_windows(tokens, np.array([w]), SEQ, 300)
    with pytest.raises(MoleError, match="token id -3"):
        data.token_counts(tokens, 300)


def _damage(root: Path, case: str) -> tuple[Path, str]:
    """A dataset damaged one way: (its prefix, what the error says)."""
    seqs = [np.arange(10), np.arange(20), np.arange(5)]
    prefix = root / case.replace(" ", "-").replace(".", "")
    kw, msg = {
        "magic": ({"header": {"magic": b"MMIDIDX\x00\x01"}}, "magic is b'MMIDIDX\\x00\\x01'"),
        "version": ({"header": {"version": 2}}, "unknown version 2"),
        "dtype code": ({"header": {"code": 9}}, "unknown dtype code 9"),
        "float dtype": ({"header": {"code": 6}}, "holds float64 values"),
        "short header": ({"idx_tail": -(12 * 3 + 8 * 4 + 20)}, "fewer than the 34-byte header"),
        "truncated": ({"idx_tail": -8}, "need 102 bytes"),
        "trailing bytes": ({"idx_tail": 2}, "but it has 104"),
        "counts": ({"header": {"n_seq": 4}}, "its counts (4 sequences, 4 documents) need"),
        "documents decrease": ({"docs": [0, 2, 1, 3]}, "document indices decrease at entry 2 (2 -> 1)"),
        "document out of range": ({"docs": [0, 1, 2, 4]}, "document index 3 is 4, outside [0, 3]"),
    }.get(case, ({}, None))
    bin_path, idx_path = write_indexed(prefix, seqs, np.uint16, **kw)
    if msg:
        return prefix, msg
    raw = bytearray(idx_path.read_bytes())
    lengths, pointers = 34, 34 + 4 * 3
    if case == "pointer beyond the .bin":
        raw[pointers + 8:pointers + 16] = struct.pack("<q", 60)
        msg = "sequence 1 (byte pointer 60, 20 tokens of 2 bytes) lies outside"
    elif case == "negative pointer":
        raw[pointers:pointers + 8] = struct.pack("<q", -2)
        msg = "sequence 0 (byte pointer -2"
    elif case == "pointer inside an id":
        raw[pointers + 16:pointers + 24] = struct.pack("<q", 59)
        msg = "sequence 2's byte pointer 59 is not a multiple of 2 (uint16)"
    elif case == "negative length":
        raw[lengths + 4:lengths + 8] = struct.pack("<i", -1)
        msg = "sequence 1 has length -1"
    elif case == "truncated .bin":
        bin_path.write_bytes(bin_path.read_bytes()[:50])
        msg = "lies outside"
    elif case == "overlapping sequences":  # every pointer in range, but more tokens than the .bin holds
        raw[pointers + 8:pointers + 24] = struct.pack("<qq", 0, 0)
        bin_path.write_bytes(bin_path.read_bytes()[:40])
        msg = "it counts 35 tokens (70 bytes) but"
    elif case == "missing .bin":
        bin_path.unlink()
        return prefix, f"{bin_path} does not exist"
    idx_path.write_bytes(bytes(raw))
    return prefix, msg


DAMAGES = ["magic", "version", "dtype code", "float dtype", "short header", "truncated", "trailing bytes", "counts",
           "documents decrease", "document out of range", "pointer beyond the .bin", "negative pointer",
           "pointer inside an id", "negative length", "truncated .bin", "overlapping sequences", "missing .bin"]


def test_damaged_index_is_one_line_naming_the_file(tmp_path):
    """Each damage: a MoleError naming the file and what is wrong, which `mole-jax train --data` prints as one
    line on stderr with exit status 2, creating nothing."""
    for case in DAMAGES:
        prefix, msg = _damage(tmp_path, case)
        with pytest.raises(MoleError) as e:
            data.read_indexed(prefix)
        assert msg in str(e.value) and str(prefix) in str(e.value) and "\n" not in str(e.value), (case, e.value)
        with pytest.raises(MoleError, match="damaged|does not exist|holds float64"):
            data.open_corpus([str(prefix) + ".bin"], vocab_size=V)
        out = tmp_path / f"run-{prefix.name}"
        status, _, err = run_cli("train", "--preset", "tiny-mole", "--data", prefix, "--out", out, "--steps", "1")
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, (case, err[-2000:])
        assert not out.exists()


def test_train_on_two_files_is_the_flat_files_run_and_resumes_only_on_them(stream, tmp_path):
    """`mole-jax train --data a.bin b.bin` trains exactly as on all.bin (the same losses); run.json records both
    files' fingerprints; resuming with other files is refused, and without --data reopens the two."""
    root, _ = stream
    base = ["train", "--preset", "tiny-dense", "--steps", "3", "--batch-size", "4", "--seq-len", str(SEQ),
            "--eval-every", "0", "--eval-batches", "1", "--log-every", "1", "--no-progress", "--devices", "1"]
    losses = {}
    for name, files in (("flat", ["all.bin"]), ("two", ["a.bin", "b.bin"])):
        status, out, err = run_cli(*base, "--data", *[root / f for f in files], "--out", tmp_path / name)
        assert status == 0, err[-3000:]
        metrics = (tmp_path / name / checkpoint.METRICS).read_text().splitlines()
        losses[name] = [(r["step"], r["loss"]) for r in map(json.loads, metrics)]
    assert losses["two"] == losses["flat"] and len(losses["flat"]) == 3
    recorded = json.loads((tmp_path / "two" / checkpoint.RUN_FILE).read_text())["data"]
    assert recorded["paths"] == [str(root / "a.bin"), str(root / "b.bin")]
    assert [f["fingerprint"] for f in recorded["files"]] == [data.open_corpus(root / f, vocab_size=V).description[
        "fingerprint"] for f in ("a.bin", "b.bin")]
    for other in (["b.bin", "a.bin"], ["all.bin"], ["a.bin"]):
        status, _, err = run_cli(*base, "--data", *[root / f for f in other], "--out", tmp_path / "two")
        assert status == 2 and "was trained on other data" in err, (other, err[-2000:])
    status, out, err = run_cli(*base, "--out", tmp_path / "two")  # the run's own data: a.bin b.bin again
    assert status == 0 and "to step 3 (already complete)" in out, err[-3000:]
