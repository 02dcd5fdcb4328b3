"""The `mole-jax` command. Each subcommand is a thin layer over the Python API; bad input exits 2 with one line
on stderr (no traceback). Heavy imports happen inside the subcommands so that `--help` is instant."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _cmd_import_hf(args):
    from mole_jax.hf import import_hf

    out = import_hf(args.src, args.out, moe_top_k=args.moe_top_k, overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_export_hf(args):
    from mole_jax.hf import export_hf

    out = export_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _add_hf(sub):
    p = sub.add_parser("import-hf", help="convert the authors' checkpoint (HF directory) into a mole-jax run dir")
    p.add_argument("src", help="directory with config.json and model.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="run directory to create")
    p.add_argument("--moe-top-k", type=int, default=None,
                   help="experts per token for MoE (default: config's num_experts_per_tok, else 2; the released "
                        "modeling_moe.py hard-codes 10)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a checkpoint in the authors' format (config.json + safetensors)")
    p.add_argument("ckpt", help="run directory, checkpoints directory or step directory")
    p.add_argument("out", help="directory to create")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_export_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mole-jax", description="Mixture of Lookup Experts in JAX: train, convert, decode.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_hf(sub)
    bench = sub.add_parser("bench", help="benchmarks: variants side by side in one run, reported as ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    del bench_sub  # each area registers its benchmark here: _add_bench_<area>(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mole_jax.config import MoleError

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
