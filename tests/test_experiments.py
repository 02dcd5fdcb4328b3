"""The experiment scripts end to end at --scale tiny (each trains, converts, scores, times and writes md/json/png),
their sharing of training runs, their bad-input handling, and prepare_data.py's token files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import compression  # the experiment scripts: experiments/ is on pytest's pythonpath (pytest.ini)
import dedup
import experts
import latency
import prepare_data
import quality
from mole_jax import data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training-runs directory for the module: scripts share the runs of equal settings, as users' do."""
    return tmp_path_factory.mktemp("runs")


def run_tiny(script, name: str, out: Path, runs: Path, *extra: str) -> dict:
    rc = script.main(["--scale", "tiny", "--out", str(out), "--runs", str(runs), "--devices", "1", "--no-progress",
                      *extra])
    assert rc == 0
    for ext in ("md", "json", "png"):
        f = out / f"{name}_tiny.{ext}"
        assert f.is_file() and f.stat().st_size > 0, f
    assert not list(out.glob("*.tmp*"))  # written under temporary names, then renamed
    result = json.loads((out / f"{name}_tiny.json").read_text())
    assert result["experiment"] == name and result["scale"] == "tiny" and result["rows"]
    assert f"experiments/{name}.py --scale tiny" in result["command"] and result["wall_seconds"] > 0
    md = (out / f"{name}_tiny.md").read_text()
    assert md.count("\n|") >= len(result["rows"]) + 1 and f"({name}_tiny.png)" in md
    assert (out / f"{name}_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


def _one_line(err: str) -> str:
    """A refusal's stderr: exactly one non-empty line, no traceback; that line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def finite(row: dict, *keys: str) -> bool:
    return all(isinstance(row[k], (int, float)) and math.isfinite(row[k]) for k in keys)


def local_task(root: Path) -> Path:
    """An lm-eval multiple-choice task over a local JSON lines file (the paper's kind of task, offline)."""
    docs = [{"question": "what does the interpreter read?", "choices": ["source code", "a melon"], "label": 0},
            {"question": "what does a function return?", "choices": ["a weather report", "a value"], "label": 1},
            {"question": "what does import load?", "choices": ["a module", "a boat"], "label": 0}]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "mc.yaml").write_text(
        "task: experiments_local_mc\noutput_type: multiple_choice\ndataset_path: json\ntest_split: test\n"
        f"dataset_kwargs:\n  cache_dir: {root / 'hf-cache'}\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return root


@pytest.fixture(scope="module")
def quality_result(tmp_path_factory, runs):
    tasks = local_task(tmp_path_factory.mktemp("tasks"))
    with pytest.MonkeyPatch.context() as mp:  # lm-eval and datasets: local files only
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        return run_tiny(quality, "quality", tmp_path_factory.mktemp("quality"), runs,
                        "--tasks", "experiments_local_mc", "--task-path", str(tasks))


def test_quality(quality_result):
    rows = {r["model"]: r for r in quality_result["rows"]}
    assert list(rows) == ["Dense", "MoE-10E", "MoLE-4E"]
    for r in rows.values():
        assert finite(r, "val_loss", "val_perplexity", "train_loss", "vs_dense", "tokens_per_s", "train_wall_s")
        assert r["val_loss"] < math.log(512)  # learned something: below the uniform distribution's loss
        assert r["train_tokens"] == 40 * 8 * 64 and not r["reused_run"]
        # equal activated parameters: the MoE's top-2 half-width experts and MoLE's router add < 2%
        assert abs(r["params_active"] / rows["Dense"]["params_active"] - 1) < 0.02
    assert rows["Dense"]["vs_dense"] == 0 and len({r["run"] for r in rows.values()}) == 3
    mole = rows["MoLE-4E"]
    # the float32 table is the re-parameterisation: the same loss as the training form, on the same windows
    assert finite(mole, "val_loss_lut_fp32", "val_loss_scored") and mole["lut_windows"] == 64
    assert abs(mole["lut_minus_training_form"]) < 1e-5
    # the scoring path (LanguageModel.token_logprobs) agrees with mole_jax.evaluate on the same 64 windows
    assert abs(mole["val_loss_scored"] - mole["val_loss"]) < 1e-5
    assert quality_result["paper"] is None or quality_result["paper"]["MoLE-4E"]["AVG"] == 40.8
    # zero-shot through lm-eval and the mole_jax adapter: 3 two-way questions, so acc is a multiple of 1/3
    for r in rows.values():
        acc = r["zero_shot"]["experiments_local_mc"]["acc"]
        assert acc in (0, 1 / 3, 2 / 3, 1) and r["zero_shot_avg"] == pytest.approx(100 * acc)
    table = quality_result["extra_tables"]["Zero-shot accuracy % (lm-eval, acc)"]
    assert [t["model"] for t in table][:3] == ["Dense", "MoE-10E", "MoLE-4E"]


def test_experts_reuses_quality_runs(tmp_path, runs, quality_result):
    result = run_tiny(experts, "experts", tmp_path, runs)
    rows = result["rows"]
    assert [r["num_experts"] for r in rows] == [None, 2, 4, 8, 16]
    assert all(finite(r, "val_loss", "vs_dense") for r in rows)
    # Dense and MoLE-4E are quality.py's runs (same settings, same directory), trained once
    quality_runs = {r["model"]: r["run"] for r in quality_result["rows"]}
    assert rows[0]["run"] == quality_runs["Dense"] and rows[2]["run"] == quality_runs["MoLE-4E"]
    assert rows[0]["reused_run"] and rows[2]["reused_run"] and not rows[1]["reused_run"]
    assert [r["lut_row_bytes_fp16"] for r in rows[1:]] == [2 * 2 * n * 64 for n in (2, 4, 8, 16)]  # 2 B * L * N * d


def test_compression(tmp_path, runs, quality_result):
    result = run_tiny(compression, "compression", tmp_path, runs)
    rows = {r["scheme"]: r for r in result["rows"]}
    assert list(rows) == ["float32", "bfloat16", "float16", "int8", "nf4", "nf3"]
    assert all(finite(r, "val_loss", "vs_fp32_table", "max_abs_error", "mean_abs_error") for r in rows.values())
    assert rows["float32"]["max_abs_error"] == 0 and rows["float32"]["of_fp16"] == 2.0
    # stored bytes at d = 64 (one block per expert vector): int8 64 B + a float32 scale, nf4 32 B + a float32
    # scale, nf3 24 B + a float16 scale, per (layer, expert), against float16's 128 B
    assert [rows[s]["of_fp16"] for s in ("int8", "nf4", "nf3")] == [68 / 128, 36 / 128, 26 / 128]
    errors = [rows[s]["mean_abs_error"] for s in ("float16", "bfloat16", "int8", "nf4", "nf3")]
    assert errors == sorted(errors) and errors[0] > 0
    assert abs(rows["float32"]["vs_training_form"]) < 1e-5  # exact re-parameterisation
    assert abs(rows["float16"]["vs_fp32_table"]) < 1e-3 and abs(rows["nf3"]["vs_fp32_table"]) < 0.1
    mole_run = next(r["run"] for r in quality_result["rows"] if r["model"] == "MoLE-4E")
    assert all(Path(r["table"]).parent == Path(mole_run) / "luts" for r in rows.values())


def test_latency(tmp_path, runs):
    result = run_tiny(latency, "latency", tmp_path, runs)
    rows = {(r["model"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in latency.MODELS for b in (1, 4)}  # the paper's rows only
    assert all(finite(r, "ms_per_step", "modeled_ms_per_step") and r["ms_per_step"] > 0 for r in rows.values())
    for b in (1, 4):
        assert rows["dense", b]["h2d_bytes_per_step"] == rows["mole-device", b]["h2d_bytes_per_step"] == 0
        # MoLE moves rows of a few KiB per step, the offloaded MoE whole experts
        assert rows["moe-offload", b]["h2d_bytes_per_step"] > 10 * rows["mole-host", b]["h2d_bytes_per_step"] > 0
        assert 0 < rows["moe-offload", b]["experts_loaded_per_layer"] <= 10  # fewer than top-k: experts still resident


def test_dedup(tmp_path, runs):
    result = run_tiny(dedup, "dedup", tmp_path, runs)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "mole-dedup", "mole-plain"}
    assert all(finite(r, "step_ms", "step_time_vs_dense") and r["tokens_per_step"] == 512 for r in rows.values())
    assert 0 < rows["mole-dedup"]["unique_fraction"] < 1 and rows["mole-dedup"]["dedup_rows"] > 0


def test_paper_scale_needs_data_and_plan_runs_nothing(tmp_path, runs, capsys):
    assert quality.main(["--scale", "paper", "--out", str(tmp_path / "q"), "--runs", str(runs)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--data" in err
    assert experts.main(["--scale", "tiny", "--experts", "0,4", "--out", str(tmp_path / "e"), "--runs",
                         str(tmp_path / "r")]) == 2
    assert "--experts" in _one_line(capsys.readouterr().err)
    assert quality.main(["--scale", "paper", "--plan", "--out", str(tmp_path / "q"), "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "accelerator_hours" in out and "mole-16e-160m" in out and "moe-34e-160m" in out
    assert not (tmp_path / "q").exists() and not (tmp_path / "e").exists() and not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("corpus")
    docs = [topics[k] for k in sorted(topics)[:40]]
    tok = data.train_tokenizer(docs, 300)
    tok.save(str(root / "tokenizer.json"))
    return root, docs, tok


def test_prepare_data_jsonl_and_saved_dataset(corpus, tmp_path):
    root, docs, tok = corpus
    lines = [json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs[:25])]
    (tmp_path / "a.jsonl").write_text("".join(lines))
    import datasets

    datasets.Dataset.from_dict({"text": docs[25:]}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "tokens.bin"
    assert prepare_data.main([str(tmp_path / "a.jsonl"), str(tmp_path / "ds"), "--tokenizer",
                              str(root / "tokenizer.json"), "--out", str(out)]) == 0
    expected = data.tokenize(docs, tok)  # the library's own tokenisation: EOS after every document
    np.testing.assert_array_equal(np.fromfile(out, np.uint16), expected)
    corpus_ = data.open_corpus(str(out), vocab_size=300)  # what training reads
    assert corpus_.tokens.size == expected.size

    short = tmp_path / "short.bin"
    assert prepare_data.main([str(tmp_path / "a.jsonl"), "--tokenizer", str(root / "tokenizer.json"), "--out",
                              str(short), "--max-tokens", "1000"]) == 0
    np.testing.assert_array_equal(np.fromfile(short, np.uint16), expected[:1000])


def test_prepare_data_bad_input(corpus, tmp_path, capsys):
    root, _, _ = corpus
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    out = tmp_path / "t.bin"
    assert prepare_data.main([str(tmp_path / "bad.jsonl"), "--tokenizer", str(root / "tokenizer.json"), "--out",
                              str(out)]) == 2
    assert "bad.jsonl:2" in _one_line(capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob("t.bin*"))  # nothing half-written left behind
    assert prepare_data.main([str(tmp_path / "missing.jsonl"), "--tokenizer", str(root / "tokenizer.json"),
                              "--out", str(out)]) == 2
    assert "does not exist" in _one_line(capsys.readouterr().err)
