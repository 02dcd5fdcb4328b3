"""The `mole-jax` command. Each subcommand is a thin layer over the Python API; bad input exits 2 with one line
on stderr (no traceback). Heavy imports happen inside the subcommands so that `--help` is instant, and so that
arguments are refused before any work: ranges and choices as they are parsed (a size of 0 is an error, never the
default), then the existence of inputs and the writability of outputs, before JAX is imported or anything
written."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mole_jax.config import REMAT_POLICIES, TRAINABLE, MoleError, check_creatable, TrainConfig, get_preset, presets

# The table schemes of mole_jax.schemes.SCHEMES (a test keeps the two equal). Importing that module loads ml_dtypes,
# about a second of CPU on its own: a mistyped --dtype must be refused before that.
TABLE_SCHEMES = ("float32", "bfloat16", "float16", "int8", "nf4", "nf3")
ERROR_PREFIX = "mole-jax: error: "


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too), as main() reports
        print(ERROR_PREFIX + " ".join(message.split()), file=sys.stderr)
        sys.exit(2)


# Arguments checked as they are parsed, before any module that does work is imported ------------------------------
def _checked(ok, need: str) -> type[argparse.Action]:
    """An argparse action refusing a value (or any value of a list) for which ok(value) is false, in one line:
    "--steps must be a positive integer, got 0". A size of 0 is an error, never a stand-in for the default
    (leave the option out for that). Defaults are not checked: they are the code's own."""

    class Checked(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            for value in values if isinstance(values, list) else [values]:
                if not ok(value):
                    shown = repr(value) if isinstance(value, str) else value
                    parser.error(f"{option_string or self.dest} must be {need}, got {shown}")
            setattr(namespace, self.dest, values)

    return Checked


POSITIVE_INT = _checked(lambda v: v > 0, "a positive integer")
NON_NEGATIVE_INT = _checked(lambda v: v >= 0, "a non-negative integer")
POSITIVE = _checked(lambda v: v > 0, "a positive number")  # NaN fails too
NON_NEGATIVE = _checked(lambda v: v >= 0, "a non-negative number")
PROBABILITY = _checked(lambda v: 0 < v <= 1, "in (0, 1]")
FRACTION = _checked(lambda v: 0 <= v < 1, "in [0, 1)")
NON_EMPTY_TEXT = _checked(lambda v: v != "", "non-empty text")


def _int_list(text: str) -> list[int]:
    """A comma-separated list of integers (each then checked by the option's action)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _mole_preset(name: str) -> str:
    """A preset name of a MoLE model (quickstart trains, converts and decodes through the table)."""
    try:
        get_preset(name)
    except MoleError as e:  # "unknown preset ..., choose one of ..."
        raise argparse.ArgumentTypeError(str(e)) from None
    if presets[name].kind != "mole":
        mole = ", ".join(n for n, c in presets.items() if c.kind == "mole")
        raise argparse.ArgumentTypeError(f"{name} is a {presets[name].kind} model; quickstart needs a MoLE preset: "
                                         f"{mole}")
    return name


def _is_url(location: str) -> bool:
    return "://" in location


def check_input(path: str, what: str = "checkpoint") -> None:
    """An input that must exist (a checkpoint, a table, a file); nothing is read yet."""
    if not _is_url(path) and not os.path.exists(os.path.expanduser(path)):
        raise MoleError(f"{what} not found: {path} does not exist")


def check_output(path: str, *, file: bool = False) -> None:
    """An output location (a directory, or a file with file=True) that can be written: it is a directory (a file)
    if it exists, and its nearest existing ancestor is a directory this process may write into. Missing parents
    are created only when the command writes, after every argument was checked, so a refused command leaves no
    directory behind. kvstore URLs (memory://, gs://) are checked by Tensorstore when written."""
    if _is_url(path):
        return
    target = Path(path).expanduser().absolute()
    if target.exists():
        if file and target.is_dir():
            raise MoleError(f"{target} is a directory, not a file")
        if not file and not target.is_dir():
            raise MoleError(f"{target} is a file, not a directory")
        if not os.access(target if target.is_dir() else target.parent, os.W_OK):
            raise MoleError(f"{target} is not writable")
        return
    check_creatable(target)


def make_parents(*files: str | None) -> None:
    """The missing parent directories of output files, created once every argument was checked: the one rule of
    every output path (train, convert, upcycle and import-hf create their directories' parents too)."""
    for f in files:
        if f is not None and not _is_url(f):
            Path(f).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)


def _cmd_import_hf(args):
    if not os.path.isdir(os.path.expanduser(args.src)):
        raise MoleError(f"{args.src} is not a directory (expected a Hugging Face model directory)")
    check_output(args.out)
    if args.tokenizer is not None:
        check_input(args.tokenizer, "tokenizer")
    from mole_jax.hf import import_hf

    out = import_hf(args.src, args.out, moe_top_k=args.moe_top_k, overwrite=args.overwrite, tokenizer=args.tokenizer)
    print(f"wrote {out}")


def _cmd_export_hf(args):
    check_input(args.ckpt)
    check_output(args.out)
    from mole_jax.hf import export_hf

    out = export_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _add_hf(sub):
    p = sub.add_parser("import-hf", help="convert the authors' checkpoint (HF directory) into a mole-jax run dir")
    p.add_argument("src", help="directory with config.json and model.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="run directory to create")
    p.add_argument("--moe-top-k", type=int, default=None, action=POSITIVE_INT,
                   help="experts per token for MoE (default: config's num_experts_per_tok, else 2; the released "
                        "modeling_moe.py hard-codes 10)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json, or a directory holding one, copied into OUT for generate and eval "
                        "(default: SRC/tokenizer.json if present; the released checkpoints use GPT-NeoX-20B's)")
    p.set_defaults(func=_cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a checkpoint in the authors' format (config.json + safetensors)")
    p.add_argument("ckpt", help="run directory, checkpoints directory or step directory")
    p.add_argument("out", help="directory to create")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_export_hf)


def _cmd_upcycle(args):
    check_input(args.dense_ckpt)
    check_output(args.out)
    from mole_jax.upcycling import upcycle

    out = upcycle(args.dense_ckpt, args.out, num_experts=args.experts, init=args.init, expert_dim=args.expert_dim,
                  seed=args.seed)
    print(f"wrote {out}: MoLE with {args.experts} new routed experts per layer, step 0 = the Dense model "
          f"({args.init}); train it with: mole-jax train --out {out} --steps N --train new|all")


def _add_upcycle(sub):
    p = sub.add_parser("upcycle", help="a trained Dense checkpoint -> a MoLE run directory with new routed experts "
                                       "whose step-0 logits are the Dense model's")
    p.add_argument("dense_ckpt", help="run directory, checkpoints directory or step directory of a Dense model")
    p.add_argument("out", help="run directory to create (then: mole-jax train --out OUT ...)")
    p.add_argument("--experts", type=int, default=4, action=_checked(lambda v: v >= 1, "at least 1"),
                   help="routed experts per layer (4)")
    p.add_argument("--init", default="zero-down",
                   help="the new parameters: zero-down (default: zero down-projections), zero-down-router (the "
                        "router zero too), small-down (a fresh MoLE's init; step 0 then differs slightly)")
    p.add_argument("--expert-dim", type=int, default=None, action=POSITIVE_INT,
                   help="routed experts' width (default: the Dense FFN's)")
    p.add_argument("--seed", type=int, default=0, action=NON_NEGATIVE_INT, help="of the new random weights (0)")
    p.set_defaults(func=_cmd_upcycle)


def _cmd_convert(args):
    import signal

    check_input(args.ckpt)
    check_output(args.lut_dir)
    from mole_jax.convert import ConversionStopped, convert_to_lut, return_freed_memory_promptly
    from mole_jax.lut import read_info

    return_freed_memory_promptly()  # each layer's experts leave memory once used: peak RSS of about one layer
    try:
        where = convert_to_lut(args.ckpt, args.lut_dir, args.dtype, batch_rows=args.batch_rows,
                               shard_rows=args.shard_rows, block=args.block, overwrite=args.overwrite,
                               progress=not args.no_progress, buffer_bytes=args.buffer_mb << 20,
                               stop_signals=(signal.SIGTERM, signal.SIGINT))
    except ConversionStopped as e:  # at a step boundary, every shard written kept: 143 (SIGTERM) or 130 (SIGINT)
        print(f"mole-jax: {e}", file=sys.stderr)
        raise SystemExit(e.exit_status) from None
    info = read_info(where)
    print(f"wrote {where}: {info['scheme']} {info['shape']}, {info['nbytes']:,} bytes "
          f"({info['nbytes'] / info['fp16_nbytes']:.1%} of float16), fingerprint {info['fingerprint'][:16]}")


def _cmd_lut_info(args):
    check_input(args.lut_dir, "lookup table")
    from mole_jax.lut import read_info

    info = read_info(args.lut_dir)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    V, L, N, D = info["shape"]
    ver = info.get("verification") or {}
    block = f" (block {info['block']})" if info["scheme"] in ("nf4", "nf3") else ""
    complete = (f"yes (verified {ver.get('rows')} rows: max error {ver.get('max_abs_error', 0):.3g}, "
                f"{ver.get('max_error_over_allowed', 0):.3g} of the allowed)" if info["complete"] and
                "max_abs_error" in ver else "yes" if info["complete"] else
                "NO: interrupted or unverified; rerun the same `mole-jax convert` command")
    for k, v in [("location", info["location"]), ("shape", f"[{V}, {L}, {N}, {D}]  (V, layers, experts, d_model)"),
                 ("scheme", info["scheme"] + block),
                 ("bytes", f"{info['nbytes']:,} ({info['nbytes'] / info['fp16_nbytes']:.1%} of float16)"),
                 ("row bytes", f"{info['row_nbytes']:,}"),
                 ("shards", f"{info['shards_written']} of {info['num_shards']} written, "
                            f"{info['shard_rows']} rows each"),
                 ("fingerprint", info["fingerprint"]), ("complete", complete)]:
        print(f"{k:<12} {v}")


def _cmd_lut_verify(args):
    check_input(args.lut_dir, "lookup table")
    if args.ckpt is not None:
        check_input(args.ckpt)
    from mole_jax.convert import verify_lut

    r = verify_lut(args.lut_dir, args.ckpt, rows=args.rows, full=args.full, seed=args.seed,
                   progress=not args.no_progress)
    for line in r["problems"]:
        print(f"bad {line}")
    if not r["ok"]:  # exit 1: the table is damaged or wrong (exit 2 stays for bad input)
        print(f"{args.lut_dir}: {len(r['problems'])} of {r['shards']} shards missing, damaged or wrong: FAILED")
        raise SystemExit(1)
    sums = "every row's checksum verified" if r["checksum"] else "no row checksums to verify"
    which = "every row" if args.full else f"{args.rows} per shard, seed {r['seed']}"
    rows = ("" if args.ckpt is None else f"; {r['rows']} rows recomputed from {args.ckpt} ({which}), max |error| "
            f"{r['max_abs_error']:.4g}, {r['max_error_over_allowed']:.4g} of the allowed")
    print(f"{args.lut_dir}: {r['shards']} shards present, {sums}{rows}: ok")


def _cmd_lut_upgrade(args):
    # no check_input: an upgrade interrupted between its two renames leaves LUT_DIR missing (its old and new
    # forms beside it), and the rerun finishes it; upgrade_table refuses a path that is neither, in one line
    from mole_jax.lut_writer import upgrade_table

    r = upgrade_table(args.lut_dir, progress=not args.no_progress)
    if r["status"] == "current":
        print(f"{r['location']} is already format version 3: nothing to do")
        return
    rows = (f", {r['shard_rows']} rows each" + (f" (was {r['from_shard_rows']})"
                                               if r["shard_rows"] != r["from_shard_rows"] else ""))
    done = "upgraded" if r["status"] == "upgraded" else "finished upgrading"
    shards = f"{r['num_shards']} shard{'s' if r['num_shards'] != 1 else ''}"
    print(f"{done} {r['location']} to format version 3: {shards}{rows}, every row checked, "
          f"fingerprint {r['fingerprint'][:16]}")


def _add_lut(sub):

    p = sub.add_parser("convert", help="MoLE re-parameterisation: a training-form checkpoint -> lookup table")
    p.add_argument("ckpt", help="run directory, checkpoints directory or step directory of a MoLE model")
    p.add_argument("lut_dir", help="table directory to create (or a kvstore URL: memory://, gs://, s3://)")
    p.add_argument("--dtype", default="float16", choices=TABLE_SCHEMES, help="storage scheme (default float16)")
    p.add_argument("--batch-rows", type=int, default=None, action=POSITIVE_INT,
                   help="vocabulary rows each device computes per step (must divide the shard rows)")
    p.add_argument("--shard-rows", type=int, default=None, action=POSITIVE_INT,
                   help="rows per table file (default: ~64 MiB files)")
    p.add_argument("--buffer-mb", type=int, default=2048, action=POSITIVE_INT,
                   help="host memory for the table rows computed in one pass over the layers (default 2048); each "
                        "pass reads every layer's experts once, so more memory means fewer reads")
    p.add_argument("--block", type=int, default=None, action=POSITIVE_INT,
                   help="nf4/nf3 quantisation block (default 768/128 or the largest divisor of d_model below)")
    p.add_argument("--checksum", action="store_true", help="(always on: every row has a crc32c; kept for scripts)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete table (an interrupted conversion of the same model always resumes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    lut_p = sub.add_parser("lut", help="inspect, verify and upgrade lookup tables")
    lut_sub = lut_p.add_subparsers(dest="lut_command", required=True, parser_class=_Parser)
    p = lut_sub.add_parser("info", help="shape, scheme, bytes, row bytes, fingerprint, complete or not")
    p.add_argument("lut_dir")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.set_defaults(func=_cmd_lut_info)
    p = lut_sub.add_parser("verify", help="check every shard's presence and checksums; with CKPT, recompute rows "
                                          "and compare (exit 1 naming each bad shard)")
    p.add_argument("lut_dir")
    p.add_argument("ckpt", nargs="?", default=None, help="the checkpoint the table was converted from")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--rows", type=int, default=4, action=POSITIVE_INT,
                       help="random rows per shard to recompute from CKPT (4)")
    which.add_argument("--full", action="store_true", help="recompute every row from CKPT")
    p.add_argument("--seed", type=int, default=None, action=NON_NEGATIVE_INT,
                   help="of the random rows (default: a fresh one, printed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_lut_verify)
    p = lut_sub.add_parser("upgrade", help="rewrite a table of format version 2 as version 3 in place (resumable: "
                                           "rerun after an interruption)")
    p.add_argument("lut_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_lut_upgrade)


def _cmd_bench_convert(args):
    if args.json is not None:
        check_output(args.json, file=True)
    from mole_jax.bench.convert import bench_convert

    make_parents(args.json)
    bench_convert(preset=args.preset, vocab_sizes=args.vocab_sizes, dtype=args.dtype, batch_rows=args.batch_rows,
                  shard_rows=args.shard_rows, buffer_bytes=args.buffer_mb << 20 if args.buffer_mb else None,
                  json_path=args.json)


def _add_bench_convert(bench_sub):
    p = bench_sub.add_parser("convert", help="conversion FLOP/s vs the measured matmul peak; host memory vs V")
    p.add_argument("--preset", default=None,
                   help="model preset (default: small-mole at d=512 on CPU, mole-4e-410m on accelerators)")
    p.add_argument("--vocab-sizes", default=None, type=_int_list, action=POSITIVE_INT,
                   help="comma-separated vocabulary sizes, converted one by one in fresh processes "
                        "(default: V/4 and V of the preset; on CPU 8192,32768)")
    p.add_argument("--dtype", default="float16", choices=TABLE_SCHEMES, help="table scheme")
    p.add_argument("--batch-rows", type=int, default=None, action=POSITIVE_INT)
    p.add_argument("--shard-rows", type=int, default=None, action=POSITIVE_INT,
                   help="default: 1024 for the CPU model, else the table's")
    p.add_argument("--buffer-mb", type=int, default=None, action=POSITIVE_INT,
                   help="as convert's --buffer-mb (default 2048)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_cmd_bench_convert)


def _parse_prompt_ids(text: str) -> list[int]:

    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MoleError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _cmd_generate(args):
    if (args.prompt is None) == (args.prompt_ids is None):
        raise MoleError("give exactly one of --prompt TEXT and --prompt-ids IDS")
    prompt_ids = None if args.prompt_ids is None else _parse_prompt_ids(args.prompt_ids)
    check_input(args.ckpt)
    for path, what in ((args.lut, "lookup table"), (args.token_counts, "token counts"), (args.tokenizer, "tokenizer")):
        if path is not None:
            check_input(path, what)
    import contextlib

    import jax

    from mole_jax import load  # with tokenizer=: read and checked before the weights
    from mole_jax.decoder import check_steps_per_dispatch

    check_steps_per_dispatch(args.steps_per_dispatch)
    tier_bytes = None if args.device_tier_mb is None else int(args.device_tier_mb * 2**20)
    model = load(args.ckpt, lut=args.lut, lut_placement=args.placement, offload_experts=args.offload_experts,
                 device_rows=args.device_rows, device_tier_bytes=tier_bytes, token_counts=args.token_counts,
                 host_read=args.host_read, storage_read=args.storage_read,
                 steps_per_dispatch=args.steps_per_dispatch, tokenizer=args.tokenizer)
    as_text = args.prompt is not None
    ids = model.encode(args.prompt) if as_text else prompt_ids
    eos = args.eos_id if args.eos_id is not None else (model.eos_id if as_text else None)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos, seed=args.seed)
    if as_text:
        sys.stdout.write(args.prompt)
    # --profile: the whole generation, prefill and compilation included, each token's host work a "decode" step
    trace = (contextlib.nullcontext() if args.profile is None else
             jax.profiler.trace(str(args.profile)))
    with trace:
        n, t0 = _print_stream(model, model.stream(ids, args.max_new_tokens, **kw), as_text)
    secs = time.perf_counter() - t0
    where = f", LUT on {model.placement}" if model.placement else ""
    tier = model.decoder.tier_counts if hasattr(model.decoder, "tier_counts") else None
    if tier is not None:
        where += f" behind a device tier of {len(model.decoder.source.ids_K):,} rows, hit rate {tier.hit_rate:.3f}"
    print(f"[{n} tokens, {1000 * secs / max(n - 1, 1):.1f} ms/token after the first{where}, "
          f"{model.h2d_bytes:,} bytes host->device]", file=sys.stderr)
    if args.profile is not None:
        print(f"[profile in {args.profile}: tensorboard --logdir {args.profile}, or its *.trace.json.gz in "
              "ui.perfetto.dev]", file=sys.stderr)


def _print_stream(model, steps, as_text: bool):
    """Print the tokens of `steps` (model.stream) as they come; each one's host work is a StepTraceAnnotation
    "decode" (the profile plugin's steps). Returns the token count and the time the first token arrived."""
    import jax

    new, shown = [], ""
    t0, n = time.perf_counter(), 0
    while True:
        with jax.profiler.StepTraceAnnotation("decode", step_num=n):
            step = next(steps, None)
        if step is None or step[0] is None:
            break
        n += 1
        if n == 1:
            t0 = time.perf_counter()  # after the prefill (and compilation)
        new.append(step[0])
        if as_text:  # print what is new in the decoded text; hold back an incomplete UTF-8 character
            text = model.decode(new)
            if not text.endswith("\ufffd") and text.startswith(shown):
                sys.stdout.write(text[len(shown):])
                shown = text
        else:
            sys.stdout.write(("" if n == 1 else " ") + str(step[0]))
        sys.stdout.flush()
    if as_text:
        text = model.decode(new)
        sys.stdout.write(text[len(shown):] if text.startswith(shown) else text)
    sys.stdout.write("\n")
    return n, t0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate from a checkpoint (MoLE: optionally with its LUT offloaded)")
    p.add_argument("ckpt", help="run directory, checkpoints directory or step directory")
    p.add_argument("--lut", default=None, help="MoLE: lookup table directory (decode in inference form); an "
                                               "inference-form checkpoint uses RUN_DIR/lut by default")
    p.add_argument("--placement", default="host", choices=["device", "host", "storage"],
                   help="where the LUT lives while decoding (default host)")
    p.add_argument("--host-read", default="program", choices=["program", "gather"],
                   help="host LUT: the compiled step reads host memory itself (program, default), or the host "
                        "gathers each step's rows and sends them (gather)")
    p.add_argument("--storage-read", default="auto", choices=["auto", "mapped", "batched"],
                   help="storage LUT: the files mapped and read by the step (CPU backend; the default there), or "
                        "batched Tensorstore reads of each step's rows (the default on accelerators)")
    p.add_argument("--steps-per-dispatch", type=int, default=None,
                   help="decode steps per dispatch when the program reads every row itself (default: "
                        "mole_jax.decoder.DEFAULT_STEPS_PER_DISPATCH)")
    p.add_argument("--offload-experts", action="store_true", help="MoE: keep the experts in host memory "
                                                                   "(the paper's offloading baseline)")
    p.add_argument("--device-rows", type=int, default=None, action=POSITIVE_INT,
                   help="a LUT the host fetches for (storage, or host with --host-read gather): keep the rows of "
                        "this many of the most frequent ids on the device (ordered by RUN_DIR/token_counts.npy, "
                        "else the lowest ids)")
    p.add_argument("--device-tier-mb", type=float, default=None, action=POSITIVE,
                   help="the same tier sized in MiB instead of rows")
    p.add_argument("--token-counts", default=None, help="a .npy of token counts [V] to order the device tier by")
    p.add_argument("--prompt", default=None, action=NON_EMPTY_TEXT,
                   help="prompt text (needs the run's tokenizer.json, or --tokenizer)")
    p.add_argument("--prompt-ids", default=None, help='prompt token ids, e.g. "1,2,3" (printed ids out)')
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json, or a directory holding one, for --prompt (default: the run's "
                        "tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=64, action=POSITIVE_INT)
    p.add_argument("--temperature", type=float, default=0.0, action=NON_NEGATIVE, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None, action=POSITIVE_INT)
    p.add_argument("--top-p", type=float, default=None, action=PROBABILITY)
    p.add_argument("--eos-id", type=int, default=None, action=NON_NEGATIVE_INT,
                   help="stop token (default with --prompt: the tokenizer's <|endoftext|>)")
    p.add_argument("--seed", type=int, default=0, action=NON_NEGATIVE_INT)
    p.add_argument("--profile", type=_profile_dir, metavar="DIR",
                   help="write a jax.profiler trace of the generation to DIR (TensorBoard's profile plugin, "
                        "Perfetto)")
    p.set_defaults(func=_cmd_generate)


def _cmd_bench_decode(args):
    for path, file in ((args.json, True), (args.plot, True), (args.workdir, False)):
        if path is not None:
            check_output(path, file=file)
    from mole_jax.bench.decode import bench_decode

    make_parents(args.json, args.plot)
    if args.workdir is not None:
        Path(args.workdir).expanduser().mkdir(parents=True, exist_ok=True)
    bench_decode(preset_size=args.preset_size, batch_sizes=args.batch_sizes, prompt_len=args.prompt_len,
                 link_gbps=args.link_gbps, steps=args.steps, warmup=args.warmup, lut_dtype=args.lut_dtype,
                 dtype=args.dtype, device_rows=args.device_rows, steps_per_dispatch=args.steps_per_dispatch,
                 models=args.models, isolate=args.isolate, workdir=args.workdir, json_path=args.json,
                 plot_path=args.plot, profile_dir=args.profile)


def _add_bench_decode(bench_sub):
    p = bench_sub.add_parser("decode", help="ms/step and bytes moved: dense, MoE (resident, offloaded), MoLE "
                                            "(LUT on device, host, storage)")
    p.add_argument("--preset-size", default="small", choices=["tiny", "small", "160m", "410m", "1b"],
                   help="model family of equal activated size (default small)")
    p.add_argument("--models", default=None,
                   help="comma-separated rows to measure (default: all), e.g. dense,mole-storage; an unknown name "
                        "is refused with the list of them")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each model in a process of its own, its peak RSS recorded per row (default at 410m and "
                        "1b; --no-isolate: all in one process, each row the process's peak so far)")
    p.add_argument("--batch-sizes", default=[1, 8, 32], type=_int_list, action=POSITIVE_INT)
    p.add_argument("--prompt-len", type=int, default=512, action=POSITIVE_INT,
                   help="KV cache filled to this many positions")
    p.add_argument("--link-gbps", type=float, default=16.0, action=POSITIVE,
                   help="host->device link in GB/s for the modeled time")
    p.add_argument("--steps", type=int, default=64, action=POSITIVE_INT,
                   help="timed decode steps per (model, batch size)")
    p.add_argument("--warmup", type=int, default=16, action=NON_NEGATIVE_INT,
                   help="untimed steps before each turn of timed steps")
    p.add_argument("--steps-per-dispatch", type=int, default=16, action=POSITIVE_INT,
                   help="K of the rows whose program reads every row itself (default 16)")
    # the schemes of whole bytes per value: the modeled transfer time counts bytes per stored value
    p.add_argument("--lut-dtype", default="float16", choices=[s for s in TABLE_SCHEMES if not s.startswith("nf")],
                   help="table scheme (the paper stores float16)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="activations/params dtype (default float32 on CPU, else bfloat16)")
    p.add_argument("--device-rows", type=int, default=None, action=POSITIVE_INT,
                   help="the *-tier rows' device tier: this many of the most frequent ids (default 10%% of V)")
    p.add_argument("--workdir", default=None, help="where to write the random table (default: a temporary dir)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--plot", default=None, help="also plot ms/step per batch size to this image (matplotlib)")
    p.add_argument("--profile", type=_profile_dir, metavar="DIR",
                   help="after each row's timing, a jax.profiler trace of a few of its decode steps, in "
                        "DIR/MODEL-batchB (TensorBoard's profile plugin, Perfetto)")
    p.set_defaults(func=_cmd_bench_decode)


_TRAIN_FLAGS = {  # CLI flag -> TrainConfig field (unset flags keep TrainConfig's defaults: the paper's recipe)
    "steps": "steps", "schedule_steps": "schedule_steps", "batch_size": "batch_size", "seq_len": "seq_len",
    "grad_accum": "grad_accum", "lr": "peak_lr", "warmup_frac": "warmup_frac", "weight_decay": "weight_decay",
    "seed": "seed", "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints",
    "log_every": "log_every", "eval_every": "eval_every", "eval_batches": "eval_batches",
    "val_fraction": "val_fraction", "remat": "remat", "train": "trainable",
}


def _model_from_args(args):
    """The model config of --preset or --config with the --set overrides applied (checked before JAX starts), the
    overrides, the config file's record, and the model's name; a None config: the run in --out provides it."""
    from pathlib import Path

    from mole_jax.config import apply_overrides, parse_overrides, read_model_config

    if args.preset and args.config:
        raise MoleError("give --preset or --config, not both (--set changes single fields of either)")
    overrides = parse_overrides(args.set or [])
    if "dtype" in overrides and getattr(args, "dtype", "auto") not in ("auto", overrides["dtype"]):
        raise MoleError(f"--dtype {args.dtype} and --set dtype={overrides['dtype']} disagree: give one of them")
    config_file, name = None, args.preset
    if args.config:
        cfg, fields = read_model_config(args.config)
        config_file = {"path": str(Path(args.config).expanduser().absolute()), "model_config": fields}
        name = f"the {cfg.kind} model of {args.config}"
    else:
        cfg = get_preset(args.preset) if args.preset else None  # a bad name fails before JAX starts
    if cfg is not None:
        cfg = apply_overrides(cfg, overrides)
    return cfg, overrides, config_file, name


def _profile_steps(text: str) -> tuple[int, int]:
    """--profile-steps A:B: steps A to B, 1-based and inclusive (checked by argparse: one line, exit 2)."""
    first, sep, last = text.partition(":")
    try:
        steps = (int(first), int(last)) if sep else None
    except ValueError:
        steps = None
    if steps is None or not 1 <= steps[0] <= steps[1]:
        raise argparse.ArgumentTypeError(f"expected two step numbers A:B with 1 <= A <= B (e.g. 10:12), got {text!r}")
    return steps


def _profile_dir(text: str):
    """--profile DIR of generate and bench decode: a directory (created if missing), not a file."""
    from pathlib import Path

    where = Path(text).expanduser().absolute()
    if where.exists() and not where.is_dir():
        raise argparse.ArgumentTypeError(f"{where} is a file, not a directory")
    return where


def _cmd_train(args):
    check_output(args.out)
    if args.tensorboard is not None:
        check_output(args.tensorboard)
    if args.tokenizer is not None:
        check_input(args.tokenizer, "tokenizer")
    cfg, overrides, config_file, name = _model_from_args(args)
    flags = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    tc = TrainConfig(**flags, dedup=not args.no_dedup)
    from mole_jax import train as train_mod
    from mole_jax.config import apply_overrides

    if cfg is None:  # the model of the run in OUT (a run to resume, or an upcycled model), with its overrides
        cfg, recorded = train_mod.run_model(args.out)
        cfg = apply_overrides(cfg, overrides)
        run_set, config_file = train_mod.run_overrides(args.out)
        overrides = {**run_set, **overrides}
        name = recorded or f"the {cfg.kind} model of {args.out}"

    # before anything touches a device: join the other hosts when the environment (or the flags) ask for it
    train_mod.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    dtype = (args.dtype if args.dtype != "auto" else overrides["dtype"] if "dtype" in overrides else
             "float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg = cfg.replace(dtype=dtype)
    if "dtype" in overrides:  # recorded as it runs (an explicit --dtype wins over the run's override)
        overrides["dtype"] = dtype
    try:
        result = train_mod.train(cfg, tc, out=args.out, data_source=args.data, tokenizer=args.tokenizer,
                                 devices=args.devices, preset=args.preset, progress=not args.no_progress,
                                 overrides=overrides, config_file=config_file, peak_tflops=args.peak_tflops,
                                 tensorboard=False if args.no_tensorboard else args.tensorboard,
                                 profile_steps=args.profile_steps)
    except train_mod.Preempted as stopped:  # saved: every process says so and exits 128 + the signal number
        print(f"mole-jax: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(stopped.exit_code) from None
    if jax.process_index() == 0:
        val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        loss = f": loss {result.loss:.4f}{val}" if result.loss is not None else " (already complete)"
        print(f"trained {name} to step {result.step}{loss}; run directory {result.out}")


def _add_model_overrides(p):
    p.add_argument("--config", metavar="FILE.json",
                   help="a whole model config, as ModelConfig.to_dict writes it (instead of --preset)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a ModelConfig field on top of --preset or --config, e.g. --set num_experts=8 (repeatable; "
                        "ints, floats, true/false, strings, none; checked as the config checks it)")


def _add_train(sub):
    p = sub.add_parser("train", help="train a preset on text (resumes when OUT holds the same run)")
    p.add_argument("--preset", help="model preset, e.g. tiny-mole, small-dense, mole-4e-160m; optional when OUT "
                                    "holds a run (to resume, or an upcycled model: its model)")
    _add_model_overrides(p)
    p.add_argument("--data", nargs="+", default=None,
                   help="text file(s) or directory, a .bin token file (uint16; .u32.bin for uint32), hf:NAME for a "
                        "locally cached Hugging Face dataset, or 'default' (the default: the embedded English "
                        "corpus from Python's own documentation)")
    p.add_argument("--out", required=True, help="run directory (rerunning the same command resumes it)")
    p.add_argument("--steps", type=int, required=True, action=POSITIVE_INT, help="optimizer steps in total")
    p.add_argument("--schedule-steps", type=int, action=POSITIVE_INT,
                   help="steps the learning-rate schedule spans (default: --steps), fixed for the run: to extend a "
                        "finished run, keep it and raise --steps (later steps train at the schedule's final rate)")
    p.add_argument("--batch-size", type=int, action=POSITIVE_INT,
                   help="sequences per step, across devices and accumulation (16)")
    p.add_argument("--seq-len", type=int, action=POSITIVE_INT, help="tokens per sequence (128)")
    p.add_argument("--grad-accum", type=int, action=POSITIVE_INT, help="micro-batches per step (1)")
    p.add_argument("--lr", type=float, action=POSITIVE, help="peak learning rate (6e-4; warmup then cosine to 0.1x)")
    p.add_argument("--warmup-frac", type=float, action=FRACTION, help="fraction of steps of linear warmup (0.01)")
    p.add_argument("--weight-decay", type=float, action=NON_NEGATIVE,
                   help="AdamW decoupled weight decay on matrices (0.1)")
    p.add_argument("--seed", type=int, action=NON_NEGATIVE_INT, help="initialisation and batch order (0)")
    p.add_argument("--checkpoint-every", type=int, action=POSITIVE_INT,
                   help="steps between checkpoints (100); the last step is saved")
    p.add_argument("--keep-checkpoints", type=int, action=POSITIVE_INT, help="checkpoints kept (3)")
    p.add_argument("--log-every", type=int, action=POSITIVE_INT, help="steps between lines of metrics.jsonl (10)")
    p.add_argument("--eval-every", type=int, action=NON_NEGATIVE_INT,
                   help="steps between validation losses (100); 0: only at the end")
    p.add_argument("--eval-batches", type=int, action=POSITIVE_INT, help="validation batches per evaluation (8)")
    p.add_argument("--val-fraction", type=float, action=FRACTION,
                   help="fraction of the data held out for validation (0.05)")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the run's, else a byte-level BPE trained on the "
                                       "text with the preset's vocab size)")
    p.add_argument("--devices", type=int, action=POSITIVE_INT, help="devices to use (default: all)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; params stay float32 (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--no-dedup", action="store_true", help="MoLE: run the routed experts on every token")
    p.add_argument("--remat", choices=REMAT_POLICIES,
                   help="recompute activations in the backward pass: none (default), block (each block from its "
                        "input: least memory), dots (keep matmul outputs, recompute the rest)")
    p.add_argument("--train", choices=TRAINABLE,
                   help="what gets updates: all (default) or new (MoLE's routed experts, expert norms and routers "
                        "only, e.g. of an upcycled model: the backbone stays bit-identical)")
    p.add_argument("--peak-tflops", type=float, action=POSITIVE,
                   help="one device's peak TFLOP/s for MFU in metrics.jsonl (default: the nominal bf16 peak of a "
                        "known GPU/TPU; on CPU a float32 matmul rate measured at the start)")
    events = p.add_mutually_exclusive_group()
    events.add_argument("--tensorboard", metavar="DIR",
                        help="write TensorBoard event files of every metrics record here (default: OUT/tensorboard "
                             "when tensorboardX is installed: pip install 'mole-jax[tensorboard]')")
    events.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    p.add_argument("--profile-steps", type=_profile_steps, metavar="A:B",
                   help="write a jax.profiler trace of steps A to B (inclusive) to OUT/profile, for TensorBoard's "
                        "profile plugin or Perfetto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, action=POSITIVE_INT,
                   help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, action=NON_NEGATIVE_INT,
                   help="multi-host: this process's index (or JAX_PROCESS_ID)")
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args):
    check_input(args.run_dir)
    if args.json is not None:
        check_output(args.json, file=True)
    if args.tokenizer is not None:
        check_input(args.tokenizer, "tokenizer")
    from mole_jax.evaluation import evaluate

    r = evaluate(args.run_dir, data_source=args.data, split=args.split, batch_size=args.batch_size,
                 seq_len=args.seq_len, devices=args.devices, max_windows=args.max_windows, tokenizer=args.tokenizer)
    print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  tokens {r['tokens']:,}  "
          f"(split {r['split']}, step {r['step']})")
    if args.json:
        make_parents(args.json)
        with open(os.path.expanduser(args.json), "w") as f:
            json.dump(r, f, indent=2)
            f.write("\n")


def _add_eval(sub):
    p = sub.add_parser("eval", help="mean next-token cross-entropy and perplexity of a checkpoint on text")
    p.add_argument("run_dir", help="run directory (latest step), checkpoints directory or step directory")
    p.add_argument("--data", nargs="+", default=None, help="data as for train (default: the run's own data)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"],
                   help="the run's deterministic validation or training windows, or every window (val)")
    p.add_argument("--json", help="also write {loss (nats), perplexity, tokens, ...} to this file")
    p.add_argument("--batch-size", type=int, action=POSITIVE_INT,
                   help="sequences per batch (default: the run's micro-batch)")
    p.add_argument("--seq-len", type=int, action=POSITIVE_INT,
                   help="window length (default: the run's; 128 for an imported checkpoint)")
    p.add_argument("--max-windows", type=int, action=POSITIVE_INT, help="evaluate at most this many windows")
    p.add_argument("--devices", type=int, action=POSITIVE_INT, help="devices to use (default: all)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json, or a directory holding one, to read text data with (default: the run's "
                        "tokenizer.json)")
    p.set_defaults(func=_cmd_eval)


def _cmd_bench_train(args):
    if args.json is not None:
        check_output(args.json, file=True)
    from mole_jax.config import parse_overrides

    overrides = parse_overrides(args.set or [])  # checked before JAX starts
    if "dtype" in overrides and args.dtype not in ("auto", overrides["dtype"]):
        raise MoleError(f"--dtype {args.dtype} and --set dtype={overrides['dtype']} disagree: give one of them")
    from mole_jax.bench.train import bench_train

    make_parents(args.json)
    bench_train(preset_size=args.preset_size, tokens_per_step=args.tokens,
                seq_len=args.seq_len, micro_tokens=args.micro_tokens, iters=args.iters, dtype=args.dtype,
                devices=args.devices, json_path=args.json,
                overrides=overrides)


def _add_bench_train(bench_sub):
    p = bench_sub.add_parser("train", help="train-step time of Dense, MoLE with and without dedup, side by side")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--preset-size", default="small", help="the {size}-dense / {size}-mole presets compared (small)")
    p.add_argument("--tokens", default=[4096, 16384, 65536], type=_int_list, action=POSITIVE_INT,
                   help="tokens per step, comma-separated (4096,16384,65536)")
    p.add_argument("--seq-len", type=int, default=256, action=POSITIVE_INT, help="tokens per sequence (256)")
    p.add_argument("--micro-tokens", type=int, default=16384, action=POSITIVE_INT,
                   help="tokens per micro-batch at most; larger steps accumulate gradients (16384)")
    p.add_argument("--iters", type=int, default=3, action=POSITIVE_INT,
                   help="timed steps per variant, round-robin after a warmup (3)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--devices", type=int, action=POSITIVE_INT, help="devices to use (default: all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a ModelConfig field of both presets, e.g. --set d_model=512 (repeatable; num_experts, "
                        "expert_dim and top_k change only MoLE)")
    p.set_defaults(func=_cmd_bench_train)


def _cmd_quickstart(args):
    check_output(args.out)  # the options were checked as parsed; quickstart.run checks them again for API callers
    from mole_jax.quickstart import run

    run(args.out, preset=args.preset, steps=args.steps, table_dtype=args.dtype, placement=args.placement,
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, progress=not args.no_progress)


def _add_quickstart(sub):
    p = sub.add_parser("quickstart", help="the main job on the embedded corpus: train a small MoLE, convert it to "
                                          "a LUT on disk, generate with the LUT offloaded, report")
    p.add_argument("--out", default="runs/quickstart",
                   help="working directory; rerunning resumes (default runs/quickstart)")
    p.add_argument("--preset", default="small-mole", type=_mole_preset, help="a MoLE preset (small-mole)")
    p.add_argument("--steps", type=int, default=120, action=POSITIVE_INT, help="training steps (120)")
    p.add_argument("--dtype", default="float16", choices=TABLE_SCHEMES, help="table dtype (float16)")
    p.add_argument("--placement", default="storage", choices=["device", "host", "storage"],
                   help="where the table lives while decoding (storage: read from disk per step)")
    p.add_argument("--prompt", default="The return statement", action=NON_EMPTY_TEXT)
    p.add_argument("--max-new-tokens", type=int, default=40, action=POSITIVE_INT)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mole-jax", description="Mixture of Lookup Experts in JAX: train, convert, decode.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_quickstart(sub)
    _add_train(sub)
    _add_lut(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_hf(sub)
    _add_upcycle(sub)
    bench = sub.add_parser("bench", help="benchmarks: variants side by side in one run, reported as ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    _add_bench_convert(bench_sub)
    _add_bench_decode(bench_sub)
    _add_bench_train(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        args.func(args)
    except MoleError as e:
        print("mole-jax: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mole-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
