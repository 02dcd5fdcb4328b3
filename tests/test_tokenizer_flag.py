"""The tokenizer of an imported checkpoint. The authors' released directories hold config.json and the weights but
no tokenizer (their models use GPT-NeoX-20B's): `import-hf --tokenizer PATH` copies one into the run directory,
where `generate` and `eval` find it; `generate`/`eval --tokenizer` and `mole_jax.load(..., tokenizer=...)` give
one for a single call. A tokenizer.json beside the weights is imported as before. No network: the tokenizer is a
small BPE trained here with the `tokenizers` library, the checkpoint random weights under the official names."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import mole_jax
from conftest import prime_config, run_cli, write_hf_checkpoint
from mole_jax import checkpoint, hf
from mole_jax.config import MoleError

TEXT = ("the cat sat on the mat and the dog sat on the log; the cat saw the dog and the dog saw the cat. "
        "a bird sang in the tree while the cat slept on the warm mat by the door of the old house. ") * 4
PROMPT = "the cat sat"


def _tiny_bpe(vocab_size: int = 64) -> Tokenizer:
    """A character BPE (SentencePiece-style spaces) small enough for the test model's 97-row vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                                special_tokens=["<|endoftext|>", "[UNK]"]))
    return tok


def _one_error_line(status, out, err, *words):
    """Exit status 2, nothing on stdout, exactly one non-empty line on stderr, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and not out and len(lines) == 1 and "Traceback" not in err, (status, out, err)
    assert lines[0].startswith("mole-jax: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-style MoLE directory (config.json + model.safetensors, nothing else) and a tokenizer directory
    holding tokenizer.json, as a Hugging Face download of GPT-NeoX-20B's tokenizer would be."""
    root = tmp_path_factory.mktemp("released")
    write_hf_checkpoint(root / "MoLE-tiny", prime_config("mole"))
    (root / "gpt-neox-20b").mkdir()
    _tiny_bpe().save(str(root / "gpt-neox-20b" / "tokenizer.json"))
    return root / "MoLE-tiny", root / "gpt-neox-20b"


def test_import_with_tokenizer_flag_then_generate_text(released, tmp_path, monkeypatch):
    src, tok_dir = released
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]
    monkeypatch.chdir(tmp_path)  # a relative OUT whose parents do not exist yet: created as train/convert do
    status, out, err = run_cli("import-hf", src, "runs/new/mole-tiny", "--tokenizer", tok_dir)
    assert status == 0, err
    run = tmp_path / "runs" / "new" / "mole-tiny"
    assert (run / checkpoint.TOKENIZER).read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]  # nothing written there

    status, out, err = run_cli("generate", run, "--prompt", PROMPT, "--max-new-tokens", "6")
    assert status == 0, err
    text = out.rstrip("\n")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), out
    # the same continuation as the Python API's, with the tokenizer the run directory now holds
    model = mole_jax.load(run)
    want = model.decode(model.generate(model.encode(PROMPT), 6, eos_id=model.eos_id))
    assert text == PROMPT + want


def test_tokenizer_beside_the_weights_is_imported(released, tmp_path):
    src, tok_dir = released
    beside = tmp_path / "with-tokenizer"
    shutil.copytree(src, beside)
    shutil.copyfile(tok_dir / "tokenizer.json", beside / "tokenizer.json")
    hf.import_hf(beside, tmp_path / "run")
    assert (tmp_path / "run" / checkpoint.TOKENIZER).read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert mole_jax.load(tmp_path / "run").encode(PROMPT) == _tiny_bpe().encode(PROMPT).ids
    # --tokenizer wins over the file beside the weights
    other = _tiny_bpe(48)
    hf.import_hf(beside, tmp_path / "run48", tokenizer=other)
    assert Tokenizer.from_file(str(tmp_path / "run48" / checkpoint.TOKENIZER)).get_vocab_size() == 48


def test_load_and_generate_take_a_tokenizer_for_one_call(released, tmp_path):
    src, tok_dir = released
    hf.import_hf(src, tmp_path / "bare")  # no tokenizer anywhere: text needs one
    with pytest.raises(MoleError, match="has no tokenizer"):
        mole_jax.load(tmp_path / "bare").encode(PROMPT)
    ids = _tiny_bpe().encode(PROMPT).ids
    for given in (tok_dir, tok_dir / "tokenizer.json", str(tok_dir), _tiny_bpe()):
        model = mole_jax.load(tmp_path / "bare", tokenizer=given)
        assert model.encode(PROMPT) == ids and model.eos_id == 0
    text = model.generate_text(PROMPT, 4)
    assert isinstance(text, str) and text
    status, out, err = run_cli("generate", tmp_path / "bare", "--prompt", PROMPT, "--max-new-tokens", "4",
                               "--tokenizer", tok_dir)
    assert status == 0 and out.rstrip("\n") == PROMPT + text, (out, err)
    assert not (tmp_path / "bare" / checkpoint.TOKENIZER).exists()  # given for the call, not written


def test_eval_takes_a_tokenizer(released, tmp_path):
    src, tok_dir = released
    hf.import_hf(src, tmp_path / "bare")
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["eval", tmp_path / "bare", "--data", tmp_path / "text.txt", "--split", "all", "--seq-len", "16",
            "--batch-size", "2", "--max-windows", "4"]
    _one_error_line(*run_cli(*args), "no tokenizer.json")  # text data needs a tokenizer
    report = tmp_path / "results" / "eval" / "bare.json"  # its parents are created, as for every output
    status, out, err = run_cli(*args, "--tokenizer", tok_dir / "tokenizer.json", "--json", report)
    assert status == 0 and out.startswith("loss ") and "tokens 64 " in out, (out, err)
    loss = float(out.split()[1])
    assert np.isfinite(loss) and 0 < loss < 2 * np.log(97)
    assert json.loads(report.read_text())["tokens"] == 64


def test_bad_tokenizer_is_one_line_and_nothing_written(released, tmp_path):
    src, tok_dir = released
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(120)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    out = tmp_path / "out"
    for tokenizer, words in [(tmp_path / "missing.json", ["tokenizer not found", "does not exist"]),
                             (tmp_path / "empty", ["tokenizer not found", "holds no tokenizer.json"]),
                             (tmp_path / "broken.json", ["unreadable tokenizer"]),
                             (tmp_path / "big.json", ["120 tokens", "vocab_size is 97"])]:
        _one_error_line(*run_cli("import-hf", src, out, "--tokenizer", tokenizer), *words)
        assert not out.exists() and not list(tmp_path.glob(".out.*")), tokenizer
        with pytest.raises(MoleError, match=words[-1]):
            hf.import_hf(src, out, tokenizer=tokenizer)
    hf.import_hf(src, tmp_path / "bare")
    _one_error_line(*run_cli("generate", tmp_path / "bare", "--prompt", PROMPT, "--tokenizer",
                             tmp_path / "missing.json"), "tokenizer not found")
    _one_error_line(*run_cli("generate", tmp_path / "bare", "--prompt", PROMPT, "--tokenizer", tmp_path / "empty"),
                    "holds no tokenizer.json")
    _one_error_line(*run_cli("eval", tmp_path / "bare", "--tokenizer", tmp_path / "missing.json"),
                    "tokenizer not found")
    with pytest.raises(MoleError, match="vocab_size is 97"):
        mole_jax.load(tmp_path / "bare", tokenizer=tmp_path / "big.json")
    with pytest.raises(MoleError, match="a path or a tokenizers.Tokenizer"):
        mole_jax.load(tmp_path / "bare", tokenizer=42)
