"""Data: sources, tokenizers, the embedded default corpus, the deterministic split and batch order."""

import json
import re

import numpy as np
import pytest

from mole_jax import corpus, data
from mole_jax.config import MoleError

PROSE = """The routed experts of a Mixture of Lookup Experts read the token embedding instead of the hidden state.
Because the embedding depends only on the token id, every expert output can be computed once after training.
The table is then stored on the host or on disk, and decoding fetches one row for each token it reads.
"""


@pytest.fixture(scope="module")
def default_docs():
    return data.default_documents()


def test_default_corpus_is_real_english(default_docs):
    text = "\n".join(default_docs)
    assert len(default_docs) > 500 and len(text) > 1_000_000
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "of", "and", "to", "is", "a", "in", "that", "be", "it"}
    assert sum(w in common for w in words) / len(words) > 0.15  # English prose, not code or random bytes
    assert "The \"if\" statement" in text  # the language reference's prose (pydoc_data.topics)
    corpus = data.open_corpus(["default"], vocab_size=512)  # what `--data default` passes
    assert corpus.description["kind"] == "default" and corpus.description["num_tokens"] > 500_000
    np.testing.assert_array_equal(data.tokenize(default_docs, corpus.tokenizer), corpus.tokens)  # deterministic



def test_default_corpus_cache_holds_the_parse(tmp_path, monkeypatch):
    """The cached documents are the parsed ones; a damaged cache file is parsed again and rewritten. (A small
    stand-in for the standard library: the cache is named by the library's path, so the user's is not touched.)"""
    stdlib = tmp_path / "lib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "a.py").write_text(f'"""{PROSE}"""\n\nclass C:\n    """short"""\n\n    def f(self):\n'
                                 f'        """{PROSE[::-1]}"""\n')
    (stdlib / "pkg" / "b.py").write_text(f'def g():\n    """{PROSE.upper()}"""\n')
    (stdlib / "tests").mkdir()
    (stdlib / "tests" / "skipped.py").write_text(f'"""{PROSE}"""\n')
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    monkeypatch.setenv("MOLE_JAX_CACHE", str(tmp_path / "cache"))
    parsed = corpus._parse_default_documents(stdlib)
    assert parsed[-3:] == (PROSE.strip(), PROSE[::-1].strip(), PROSE.upper().strip())
    assert corpus.default_documents.__wrapped__() == parsed  # parsed, then written
    (cached,) = (tmp_path / "cache").glob("default-corpus-*.json")
    assert json.loads(cached.read_text()) == list(parsed)
    with monkeypatch.context() as m:  # read back, not parsed again
        m.setattr(corpus, "_parse_default_documents", lambda root: pytest.fail("parsed despite the cache"))
        assert corpus.default_documents.__wrapped__() == parsed
    for damage in ('["cut sh', "[]", '{"a": 1}'):
        cached.write_text(damage)
        assert corpus.default_documents.__wrapped__() == parsed
        assert json.loads(cached.read_text()) == list(parsed)
    assert not list(cached.parent.glob("*.tmp"))


def test_trained_tokenizer_is_deterministic_and_round_trips(default_docs):
    docs = default_docs[:300]
    a, b = data.train_tokenizer(docs, 512), data.train_tokenizer(docs, 512)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 512
    assert a.token_to_id(data.EOS) is not None
    assert a.decode(a.encode(PROSE).ids) == PROSE  # byte-level: any text encodes and decodes exactly
    with pytest.raises(MoleError, match="vocab_size >= 257"):
        data.train_tokenizer(docs, 100)


def test_text_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text(PROSE)
    (tmp_path / "d" / "sub" / "b.md").write_text(PROSE.upper())
    (tmp_path / "d" / "ignored.bin.bak").write_bytes(b"\x00\x01")
    corpus = data.open_corpus(tmp_path / "d", vocab_size=300)
    assert corpus.description["kind"] == "text" and corpus.description["num_tokens"] == corpus.tokens.size
    eos = corpus.tokenizer.token_to_id(data.EOS)
    assert np.sum(corpus.tokens == eos) == 2  # one per document (file)
    text = corpus.tokenizer.decode(corpus.tokens.tolist(), skip_special_tokens=False)
    assert text == PROSE + data.EOS + PROSE.upper() + data.EOS
    # the same text through an explicit tokenizer file gives the same stream
    corpus.tokenizer.save(str(tmp_path / "tok.json"))
    again = data.open_corpus([tmp_path / "d" / "a.txt", tmp_path / "d" / "sub" / "b.md"], vocab_size=300,
                             tokenizer=tmp_path / "tok.json")
    np.testing.assert_array_equal(again.tokens, corpus.tokens)
    assert again.description["fingerprint"] == corpus.description["fingerprint"]


def test_long_documents_are_tokenised_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PIECE_CHARS", 100)
    (tmp_path / "long.txt").write_text(PROSE * 20)
    corpus = data.open_corpus(tmp_path / "long.txt", vocab_size=300)
    assert corpus.tokenizer.decode(corpus.tokens.tolist(), skip_special_tokens=False) == PROSE * 20 + data.EOS


def test_bad_sources(tmp_path):
    with pytest.raises(MoleError, match="does not exist"):
        data.open_corpus(tmp_path / "missing.txt", vocab_size=300)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MoleError, match="is empty"):
        data.open_corpus(tmp_path / "empty.txt", vocab_size=300)
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(MoleError, match="no text"):
        data.open_corpus(tmp_path / "blank.txt", vocab_size=300)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(MoleError, match="no text files"):
        data.open_corpus(tmp_path / "nothing", vocab_size=300)
    with pytest.raises(MoleError, match="no data"):
        data.open_corpus([], vocab_size=300)


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(PROSE * 5)
    big = data.train_tokenizer([PROSE * 5], 400)
    big.save(str(tmp_path / "big.json"))
    n = big.get_vocab_size(with_added_tokens=True)
    with pytest.raises(MoleError, match=f"tokenizer has {n} tokens but the model's vocab_size is 300"):
        data.open_corpus(tmp_path / "a.txt", vocab_size=300, tokenizer=tmp_path / "big.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoleError, match="unreadable tokenizer"):
        data.load_tokenizer(tmp_path / "bad.json")


def test_neox_tokenizer(tmp_path, neox_tokenizer_path):
    (tmp_path / "a.txt").write_text(PROSE)
    with pytest.raises(MoleError, match="vocab_size is 512"):
        data.open_corpus(tmp_path / "a.txt", vocab_size=512, tokenizer=neox_tokenizer_path)
    corpus = data.open_corpus(tmp_path / "a.txt", vocab_size=50304, tokenizer=neox_tokenizer_path)
    assert corpus.tokens.dtype == np.uint16 and corpus.tokens[-1] == 0  # <|endoftext|> is id 0 in GPT-NeoX
    assert corpus.tokenizer.decode(corpus.tokens[:-1].tolist()) == PROSE


@pytest.mark.parametrize("name,dtype", [("tokens.bin", np.uint16), ("tokens.u32.bin", np.uint32)])
def test_token_file(tmp_path, name, dtype):
    ids = np.random.default_rng(0).integers(0, 70000 if dtype == np.uint32 else 60000, 5000).astype(dtype)
    ids.tofile(tmp_path / name)
    corpus = data.open_corpus(tmp_path / name, vocab_size=70000)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == dtype and corpus.tokenizer is None
    np.testing.assert_array_equal(corpus.tokens, ids)
    assert corpus.description["kind"] == "tokens" and corpus.description["num_tokens"] == 5000
    train, _ = data.split_windows(corpus.tokens.size, 16, 0.1)
    with pytest.raises(MoleError, match="outside the model's vocabulary"):
        data.read_windows(corpus.tokens, train, 16, 1000)


def test_token_file_with_partial_id_is_refused(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(MoleError, match="not a whole number"):
        data.open_corpus(tmp_path / "odd.bin", vocab_size=300)
    np.zeros(10, np.uint16).tofile(tmp_path / "a.bin")
    (tmp_path / "a.txt").write_text(PROSE)
    with pytest.raises(MoleError, match="or text, not a mix of both"):  # several token files: test_indexed_data
        data.open_corpus([tmp_path / "a.bin", tmp_path / "a.txt"], vocab_size=300)


def test_split_is_disjoint_complete_and_spread():
    train, val = data.split_windows(10_001, 10, 0.05)  # 1000 windows
    assert val.size == 50 and train.size == 950
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    assert np.all(np.diff(val) == 20)  # evenly spread over the stream
    train, val = data.split_windows(101, 10, 0.01)
    assert val.size == 1 and train.size == 9  # at least one validation window
    train, val = data.split_windows(101, 10, 0.0)
    assert val.size == 0 and train.size == 10
    with pytest.raises(MoleError, match="too few"):
        data.split_windows(15, 10, 0.05)
    with pytest.raises(MoleError, match="val_fraction"):
        data.split_windows(1000, 10, 1.0)
    np.testing.assert_array_equal(data.windows_for_split(10_001, 10, 0.05, "all"), np.arange(1000))
    with pytest.raises(MoleError, match="no validation split"):
        data.windows_for_split(10_001, 10, 0.0, "val")


def test_windows_are_inputs_and_shifted_targets():
    tokens = np.arange(1000, dtype=np.uint16)
    w = data.read_windows(tokens, np.array([0, 3]), 8, 1000)
    assert w.dtype == np.int32 and w.shape == (2, 9)
    np.testing.assert_array_equal(w[1], np.arange(24, 33))  # stride T, T + 1 tokens


def test_batch_order_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(4001, dtype=np.uint16)
    train, _ = data.split_windows(tokens.size, 10, 0.1)  # 360 training windows

    def make(seed):
        return data.Batches(tokens, train, seq_len=10, batch_size=12, seed=seed, vocab_size=5000)

    a, b = make(0), make(0)
    for step in (0, 7, 29, 30, 31, 100):  # 30 steps per epoch; step 100 starts mid-epoch
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    np.testing.assert_array_equal(a.batch(5, np.array([3, 7])), a.batch(5)[[3, 7]])  # any host's own rows
    assert not np.array_equal(a.batch(0), make(1).batch(0))
    epoch0 = np.concatenate([a.window_ids(s) for s in range(30)])
    np.testing.assert_array_equal(np.sort(epoch0), np.sort(train))  # each epoch visits every window once
    epoch1 = np.concatenate([a.window_ids(s) for s in range(30, 60)])
    assert not np.array_equal(epoch0, epoch1) and np.array_equal(np.sort(epoch1), np.sort(train))
    # a batch that straddles two epochs (batch 7 does not divide 360)
    c = data.Batches(tokens, train, seq_len=10, batch_size=7, seed=0, vocab_size=5000)
    ids = np.concatenate([c.window_ids(s) for s in range(52)])  # 364 samples
    np.testing.assert_array_equal(np.sort(ids[:360]), np.sort(train))
    np.testing.assert_array_equal(ids[360:], train[np.random.default_rng([0, 1]).permutation(360)[:4]])


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [PROSE, PROSE.upper()], "id": [1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = data.open_corpus(tmp_path / "ds", vocab_size=300)
    assert corpus.description["kind"] == "hf" and corpus.description["rows"] == 2
    text = corpus.tokenizer.decode(corpus.tokens.tolist(), skip_special_tokens=False)
    assert text == PROSE + data.EOS + PROSE.upper() + data.EOS
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "notext"))
    with pytest.raises(MoleError, match="no 'text' column"):
        data.open_corpus(tmp_path / "notext", vocab_size=300)


def test_hf_name_never_downloads():
    pytest.importorskip("datasets")
    with pytest.raises(MoleError, match="cannot load dataset 'hf:surely-not-cached/none' locally"):
        data.open_corpus("hf:surely-not-cached/none", vocab_size=300)

