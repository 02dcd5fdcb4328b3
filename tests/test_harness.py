"""The lm-eval adapter: its log-likelihoods against the model's own log-probs (numpy log_softmax of
`LanguageModel.logits`), rolling windows against an independent restatement, the LUT placements against the
training form, stop strings, and lm-eval's own `simple_evaluate` and CLI on local tasks (no network)."""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import prime_config
from mole_jax import checkpoint
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut
from mole_jax.data import EOS, train_tokenizer
from mole_jax.model import init_params

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from mole_jax.harness import MoleJaxLM, bucket  # noqa: E402

DOCS = ["the cat sat on the mat. the dog sat on the log. a bird sang in the tree. " * 8,
        "a mole digs under the garden and finds a worm. the worm is long. " * 8,
        "Question: where does the mole live? Answer: under the garden.\n" * 8]
TIMEOUT_S = 600  # a subprocess: a fresh interpreter importing JAX and lm-eval, on a slow machine
CONTEXT = 48  # the models' max_seq_len: long requests below exceed it, to exercise truncation


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No progress bars (tqdm reads TQDM_DISABLE at each bar: lm-eval's and ours) and only lm-eval's errors."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _save_run(path, cfg, params, tokenizer):
    mngr = checkpoint.manager(path / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 0, params, checkpoint.step_meta(cfg, 0))
    mngr.close()
    checkpoint.write_json_atomic(path / checkpoint.RUN_FILE, {"model_config": cfg.to_dict()})
    tokenizer.save(str(path / checkpoint.TOKENIZER))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Random-weight Dense, MoE and MoLE runs (prime sizes) with a BPE tokenizer, and the MoLE run's float32 and
    float16 tables."""
    root = tmp_path_factory.mktemp("harness")
    tok = train_tokenizer(DOCS, 300)
    out = {}
    for seed, kind in enumerate(("dense", "moe", "mole")):
        cfg = prime_config(kind, vocab_size=300, max_seq_len=CONTEXT)
        out[kind] = _save_run(root / kind, cfg, init_params(cfg, seed=40 + seed), tok)
    for scheme in ("float32", "float16"):
        convert_to_lut(out["mole"], root / f"lut-{scheme}", dtype=scheme, progress=False)
        out[f"lut-{scheme}"] = root / f"lut-{scheme}"
    return out


@pytest.fixture(scope="module")
def adapters(runs):
    """Adapters by variant, built once per module (so that their compiled shapes are reused)."""
    cache = {}

    def get(variant, **kw):
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            kind, _, placement = variant.partition("-")
            args = {"path": str(runs[kind]), "batch_size": 3, **kw}
            if placement:  # mole-host, mole-device, mole-storage, mole-host16 (a float16 table)
                scheme = "float16" if placement.endswith("16") else "float32"
                args.update(lut=str(runs[f"lut-{scheme}"]), placement=placement.rstrip("16"))
            cache[key] = MoleJaxLM(**args)
        return cache[key]

    return get


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


PAIRS = [("the cat sat on", " the mat."), ("a mole digs", " under the garden"), ("", "the worm is long."),
         ("Question: where does the mole live? Answer:", " under"),
         (DOCS[0][:150], " the dog sat on the log."),  # longer than the context: the context is cut on the left
         ("the dog ", "sat")]  # a trailing space moves to the continuation (lm-eval's rule)


def _encode_pair(lm, ctx, cont):
    """lm-eval's own split (TemplateLM): tokens of context and continuation, an empty context -> end-of-text."""
    if not ctx:
        return [lm.eot_token_id], lm.tok_encode(cont)
    spaces = len(ctx) - len(ctx.rstrip())
    ctx, cont = ctx[:len(ctx) - spaces], ctx[len(ctx) - spaces:] + cont
    ctx_ids = lm.tok_encode(ctx)
    return ctx_ids, lm.tok_encode(ctx + cont)[len(ctx_ids):]


def _logits(model, ids):
    """float64 logits of one sequence from one full pass of the model, right-padded to the context (causal: the
    padding changes nothing before it) so that the reference compiles once."""
    padded = np.zeros((1, model.config.max_seq_len), np.int32)
    padded[0, :len(ids)] = ids
    return model.logits(padded).astype(np.float64)[0, :len(ids)]


def _reference_loglikelihood(model, ctx_ids, cont_ids, max_length):
    """Sum of log p(continuation) from the model's full logits, log_softmax in float64 numpy."""
    seq = (ctx_ids + cont_ids)[-(max_length + 1):]
    n = min(len(cont_ids), len(seq) - 1)
    logits = _logits(model, seq[:-1])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.array(seq[1:])
    pos = np.arange(len(seq) - 1 - n, len(seq) - 1)
    return logp[pos, targets[pos]].sum(), bool(np.all(np.argmax(logits[pos], -1) == targets[pos]))


# Known answers: the adapter's log-likelihoods are the model's own summed log-probs ---------------------------
@pytest.mark.parametrize("variant", ["dense", "moe", "mole", "mole-host"])
def test_loglikelihood_equals_summed_logprobs_of_the_model(adapters, variant):
    lm = adapters(variant)
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    assert len(got) == len(PAIRS)
    for (ctx, cont), (logp, greedy) in zip(PAIRS, got):
        ctx_ids, cont_ids = _encode_pair(lm, ctx, cont)
        want, want_greedy = _reference_loglikelihood(lm.model, ctx_ids, cont_ids, lm.max_length)
        assert np.isfinite(logp) and logp < 0
        np.testing.assert_allclose(logp, want, rtol=1e-5)
        assert greedy == want_greedy
    long_ctx, long_cont = _encode_pair(lm, *PAIRS[4])
    assert len(long_ctx) + len(long_cont) > lm.max_length + 1  # the truncation case is really exercised


def test_greedy_flag_is_true_for_the_models_own_continuation(adapters):
    lm = adapters("mole-host")
    prompt = lm.tok_encode("the cat sat on")
    new = lm.model.generate(prompt, 4)
    (logp, greedy), (_, other) = lm._score([(prompt, new), (prompt, [(new[0] + 1) % 300] + new[1:])])
    assert greedy and not other and logp < 0


@pytest.mark.parametrize("variant", ["mole-device", "mole-storage", "mole-host16"])
def test_lut_placements_give_the_training_forms_loglikelihoods(adapters, variant):
    want = adapters("mole").loglikelihood(_requests("loglikelihood", PAIRS))
    got = adapters(variant).loglikelihood(_requests("loglikelihood", PAIRS))
    rtol = 2e-3 if variant.endswith("16") else 1e-5  # a float16 table rounds each value to 11 bits
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=rtol)
    if rtol == 1e-5:
        assert [g[1] for g in got] == [w[1] for w in want]


def test_batches_and_buckets_do_not_change_scores(adapters):
    """Padding to a length bucket and to the batch size, and the order of requests, leave each score alone."""
    pairs = PAIRS * 2
    one = adapters("mole-host", max_length=40)
    many = adapters("mole-host", max_length=40, batch_size=5)
    alone = [one._score([p]) for p in [_encode_pair(one, *pair) for pair in pairs]]
    together = many.loglikelihood(_requests("loglikelihood", pairs[::-1]))[::-1]
    np.testing.assert_allclose([t[0] for t in together], [a[0][0] for a in alone], rtol=1e-5)
    assert bucket(1, 48) == 16 and bucket(17, 48) == 32 and bucket(33, 48) == 48 and bucket(100, 64) == 64


def test_one_compile_per_length_bucket(adapters):
    """Requests of many lengths compile one scoring function per padded length (the batch size is fixed)."""
    lm = adapters("mole-device", batch_size=4)
    pairs = [(DOCS[i % 3][:n], " the mat.") for i, n in enumerate(range(5, 200, 9))]
    lm.loglikelihood(_requests("loglikelihood", pairs))
    lengths = [min(sum(map(len, _encode_pair(lm, *p))), lm.max_length + 1) - 1 for p in pairs]
    assert len(pairs) % 4 and len({bucket(n, lm.max_length) for n in lengths}) >= 3
    batches = [sorted(lengths, reverse=True)[i:i + 4] for i in range(0, len(pairs), 4)]
    assert lm.model._token_logprobs._cache_size() == len({bucket(b[0], lm.max_length) for b in batches})


# Rolling log-likelihood (perplexity tasks) ---------------------------------------------------------------------
def _reference_rolling(model, eot, ids, m):
    """lm-eval's disjoint windows restated: window k predicts tokens [k*m, min((k+1)*m, n)) of the text, each
    from as many preceding tokens (the end-of-text token, then the text) as fit in m."""
    seq = [eot] + ids
    total = 0.0
    for a in range(0, len(ids), m):
        b = min(a + m, len(ids))
        start = max(b - m, 0)
        inputs, targets = seq[start:b], seq[start + 1:b + 1]
        logits = _logits(model, inputs)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = logp[np.arange(len(targets)), targets]
        total += picked[len(targets) - (b - a):].sum()
    return total


def test_rolling_loglikelihood_short_and_windowed(adapters):
    lm = adapters("mole-host", max_length=16)
    short, long = "the cat sat on the mat.", DOCS[1][:200]
    short_ids, long_ids = lm.tok_encode(short), lm.tok_encode(long)
    assert len(short_ids) < 16 < 3 * 16 < len(long_ids)  # one window; several, the last one partial
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    # a text shorter than the context: the sum over the whole text after the end-of-text token
    np.testing.assert_allclose(got[0], _reference_rolling(lm.model, lm.eot_token_id, short_ids, 10**6), rtol=1e-5)
    np.testing.assert_allclose(got[0], lm.loglikelihood(_requests("loglikelihood", [("", short)]))[0][0], rtol=1e-5)
    np.testing.assert_allclose(got[1], _reference_rolling(lm.model, lm.eot_token_id, long_ids, 16), rtol=1e-5)
    # with a context of 40 the windows differ, and so (slightly) does the total: the windows really are used
    wide = adapters("mole-host", max_length=40).loglikelihood_rolling(_requests("loglikelihood_rolling", [(long,)]))
    np.testing.assert_allclose(wide[0], _reference_rolling(lm.model, lm.eot_token_id, long_ids, 40), rtol=1e-5)
    assert abs(wide[0] - got[1]) > 1e-3


# Generation ----------------------------------------------------------------------------------------------------
def _generate(lm, context, **gen_kwargs):
    return lm.generate_until(_requests("generate_until", [(context, gen_kwargs)]))[0]


def test_generate_until_stops_at_the_stop_string(adapters, monkeypatch):
    lm = adapters("mole-host")
    context = "the cat sat on"
    free = _generate(lm, context, until=[], max_gen_toks=20)
    ids = lm.model.generate(lm.tok_encode(context), 20, eos_id=lm.eot_token_id)
    assert free == lm.tok_decode(ids) and len(free) >= 6  # greedy, as the model's own generate
    stop = free[len(free) // 2:len(free) // 2 + 2]
    steps = []
    stream = lm.model.stream
    monkeypatch.setattr(lm.model, "stream", lambda *a, **k: (steps.append(s) or s for s in stream(*a, **k)))
    cut = _generate(lm, context, until=[stop, "\u2603"], max_gen_toks=20)
    assert cut == free[:free.find(stop)]
    assert len(steps) < 20  # the batch stopped once the stop string appeared
    # several requests of different lengths and settings, batched, give what each gives alone
    contexts = ["a mole", "the dog sat on the log. a bird", "Question: where", ""]
    alone = [_generate(lm, c, until=["."], max_gen_toks=12) for c in contexts]
    batched = lm.generate_until(_requests("generate_until", [(c, {"until": ["."], "max_gen_toks": 12})
                                                             for c in contexts] + [(context, {"max_gen_toks": 5})]))
    assert batched[:4] == alone and all("." not in t for t in alone)
    assert batched[4] == lm.tok_decode(lm.model.generate(lm.tok_encode(context), 5, eos_id=lm.eot_token_id))


# lm-eval itself: simple_evaluate on local tasks, and its CLI ------------------------------------------------
def _local_tasks(tmp_path):
    """Three tasks over local JSONL files: multiple choice (the paper's kind), generation and perplexity."""
    data = tmp_path / "data"
    data.mkdir()
    mc = [{"question": "where does the mole live?", "choices": ["under the garden", "in the tree", "on the mat"],
           "label": 0},
          {"question": "where did the cat sit?", "choices": ["on the log", "on the mat"], "label": 1},
          {"question": "what sang in the tree?", "choices": ["a worm", "a bird", "a dog", "a mole"], "label": 1},
          {"question": "what does the mole find?", "choices": ["a worm", "a cat"], "label": 0},
          {"question": "where did the dog sit?", "choices": ["in the garden", "on the log"], "label": 1}]
    gen = [{"prompt": "the cat sat on", "answer": " the mat."}, {"prompt": "a mole digs", "answer": " under"}]
    ppl = [{"text": DOCS[0][:120]}, {"text": DOCS[1][:300]}]
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
              f"dataset_kwargs:\n  cache_dir: {tmp_path / 'hf-cache'}\n  data_files:\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        "task: mole_local_mc\noutput_type: multiple_choice\n" + common + f"    test: {data / 'mc.jsonl'}\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "gen.yaml").write_text(
        "task: mole_local_gen\noutput_type: generate_until\n" + common + f"    test: {data / 'gen.jsonl'}\n"
        "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "ppl.yaml").write_text(
        "task: mole_local_ppl\noutput_type: loglikelihood_rolling\n" + common + f"    test: {data / 'ppl.jsonl'}\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return tasks, mc, gen, ppl


def test_simple_evaluate_on_local_tasks(runs, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import mole_jax  # noqa: F401  (registers "mole_jax" with lm-eval)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks, mc, gen, ppl = _local_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="mole_jax", model_args=f"path={runs['mole']},lut={runs['lut-float32']},placement=storage",
        tasks=["mole_local_mc", "mole_local_gen", "mole_local_ppl"], batch_size=4, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True)
    res = out["results"]
    # every number lm-eval reports is recomputed here from the model's own logits
    lm = MoleJaxLM(path=str(runs["mole"]))  # training form: the reference
    correct = []
    for doc in mc:
        ctx = f"Question: {doc['question']}\nAnswer:"
        scores = [_reference_loglikelihood(lm.model, *_encode_pair(lm, ctx, " " + c), lm.max_length)[0]
                  for c in doc["choices"]]
        correct.append(int(np.argmax(scores)) == doc["label"])
    assert res["mole_local_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-9)
    assert 0 <= res["mole_local_mc"]["acc_norm,none"] <= 1
    assert [s["target"] for s in out["samples"]["mole_local_mc"]] == [d["label"] for d in mc]

    generated = [s["filtered_resps"][0] for s in out["samples"]["mole_local_gen"]]
    assert len(generated) == len(gen)
    for doc, text in zip(gen, generated):
        ids = lm.model.generate(lm.tok_encode(doc["prompt"]), 8, eos_id=lm.eot_token_id)
        full = lm.tok_decode(ids)
        assert text == (full[:full.index(".")] if "." in full else full)
    assert res["mole_local_gen"]["exact_match,none"] == np.mean([t == d["answer"] for t, d in zip(generated, gen)])

    logp = sum(_reference_rolling(lm.model, lm.eot_token_id, lm.tok_encode(d["text"]), CONTEXT) for d in ppl)
    words = sum(len(re.split(r"\s+", d["text"])) for d in ppl)  # lm-eval's count (Task.count_words)
    assert res["mole_local_ppl"]["word_perplexity,none"] == pytest.approx(np.exp(-logp / words), rel=1e-4)


def test_lm_eval_cli_through_our_wrapper(runs, tmp_path):
    tasks, mc, _, _ = _local_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "mole_jax.harness", "run", "--model", "mole_jax", "--model_args",
           f"path={runs['mole']},lut={runs['lut-float16']}", "--tasks", "mole_local_mc", "--include_path",
           str(tasks), "--batch_size", "4", "--output_path", str(tmp_path / "results")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mole_local_mc" in r.stdout and "acc" in r.stdout
    written = list((tmp_path / "results").rglob("results_*.json"))
    assert len(written) == 1
    acc = json.loads(written[0].read_text())["results"]["mole_local_mc"]["acc,none"]
    assert acc in {k / len(mc) for k in range(len(mc) + 1)}
    # a bad path is one clear line and exit status 2, as everywhere in mole-jax
    bad = subprocess.run(cmd[:7] + [f"path={tmp_path / 'missing'}"] + cmd[8:], capture_output=True, text=True,
                         env=env, timeout=TIMEOUT_S)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert lines[0].startswith("mole-jax: error: checkpoint not found")


# Registration and bad input -----------------------------------------------------------------------------------
def test_registered_lazily_and_optional():
    code = ("import sys, mole_jax; from lm_eval.api.registry import get_model, model_registry; "
            "assert 'mole_jax.harness' not in sys.modules; "
            "assert get_model('mole_jax').__name__ == 'MoleJaxLM' == get_model('mole-jax').__name__; "
            "assert 'dummy' in model_registry")  # lm-eval's own models are still there
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    code = "import sys; sys.modules['lm_eval'] = None; import mole_jax; print(mole_jax.load.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0 and r.stdout.strip() == "load", r.stderr  # lm-eval absent: mole_jax still imports


def test_bad_model_args_raise_one_clear_error(runs, adapters, tmp_path):
    cases = [(dict(), "path="),
             (dict(path=str(runs["mole"]), batch_size="many"), "batch_size"),
             (dict(path=str(runs["mole"]), max_length=CONTEXT + 1), "max_length"),
             (dict(path=str(runs["mole"]), placement="moon", lut=str(runs["lut-float32"])), "placement"),
             (dict(path=str(runs["dense"]), lut=str(runs["lut-float32"])), "only for MoLE"),
             (dict(path=str(runs["mole"]), tokenizer=str(tmp_path / "none.json")), "does not exist")]
    for kwargs, msg in cases:
        with pytest.raises(MoleError, match=msg):
            MoleJaxLM(**kwargs)
    big = train_tokenizer(DOCS * 3, 400)
    big.save(str(tmp_path / "big.json"))
    if big.get_vocab_size() > 300:
        with pytest.raises(MoleError, match="vocab_size"):
            MoleJaxLM(path=str(runs["mole"]), tokenizer=str(tmp_path / "big.json"))
    lm = adapters("mole-host")
    with pytest.raises(MoleError, match="unsupported generation arguments"):
        _generate(lm, "the cat", until=["."], repetition_penalty=1.2)
    with pytest.raises(MoleError, match="max_gen_toks"):
        _generate(lm, "the cat", max_gen_toks=CONTEXT)
    assert EOS in lm.tokenizer.get_vocab()
