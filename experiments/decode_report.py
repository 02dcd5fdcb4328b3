"""Markdown and a plot from a `mole-jax bench decode --json` file: what decode_{small,160m}.{md,png} hold.

    python experiments/decode_report.py results/latency/decode_small.json --wall "2m5s"

Writes JSON's stem .md and .png beside it. The figures are the JSON's; nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mole_jax.bench.decode import _plot_decode, summary_lines

COLUMNS = [("model", "model", "{}"), ("batch_size", "batch", "{}"), ("steps_per_dispatch", "K", "{}"),
           ("cache", "cache", "{}"),
           ("ms_per_step", "ms/step", "{:.3f}"), ("vs_dense", "vs dense", "{:.3f}"),
           ("h2d_bytes_per_step", "h2d bytes/step", "{:,.0f}"),
           ("h2d_bytes_per_step_as_lut_dtype", "h2d bytes/step as table dtype", "{:,.0f}"),
           ("device_param_bytes", "device bytes", "{:,}"), (None, "modeled ms", "{:.3f}"),
           ("reread_fraction", "re-read", "{:.3f}"), ("hit_rate", "hit rate", "{:.3f}")]


def render(payload: dict, json_path: Path, wall: str, note: str) -> str:
    st, m = payload["settings"], payload["machine"]
    modeled = f"modeled_ms_per_step_{st['link_gbps']:g}gbps"
    models = st["models"]
    lines = [f"# Decode ms/step and bytes moved: `bench decode --preset-size {st['preset_size']}`", "",
             f"Command: `mole-jax bench decode --preset-size {st['preset_size']} --steps {st['steps']} --json {json_path} "
             f"--plot {json_path.with_suffix('.png')}`  ",
             f"Wall time: {wall} on {m['host_cpu']} ({m['host_cores']} cores, {m['backend']}, jax {m['jax']}). "
             f"{note}Each ratio to Dense comes from the same turns.", "",
             f"- models: {models['dense']}, {models['moe']}, {models['mole']} (equal activated size), "
             f"{st['weights']} weights, {st['dtype']}; random {st['lut_dtype']} table",
             f"- decode: KV cache of {st['prompt_len']} random positions, median of {st['steps']} steps per model "
             f"and batch size in turns of {st['chunk']} against Dense at the same steps per dispatch K (a table the "
             f"host fetches for runs one step per dispatch, against Dense at K = {st['steps_per_dispatch']}); "
             f"{st['tokens']}",
             f"- `cache`: cold = {st['cold']}; warm = warm page cache (and the default Tensorstore cache pool for "
             "batched reads)",
             f"- tier rows: a device tier of {st['device_rows']:,} rows ordered by "
             f"{st.get('tier_order', 'token counts')}; `hit rate` over the timed steps' tokens", "",
             "| " + " | ".join(h if k else h + f" ({st['link_gbps']:g} GB/s)" for k, h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in payload["rows"]:
        cells = [("" if r.get(k or modeled) is None else f.format(r[k or modeled])) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {line}" for line in summary_lines(payload["summary"], payload["storage"]["floor"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json", type=Path)
    ap.add_argument("--wall", default="not recorded", help="the run's wall time, as `time` printed it")
    ap.add_argument("--note", default="", help="anything else about the run (a sentence)")
    a = ap.parse_args()
    payload = json.loads(a.json.read_text())
    a.json.with_suffix(".md").write_text(render(payload, a.json, a.wall, a.note + " " if a.note else ""))
    st = payload["settings"]
    _plot_decode(payload["rows"], st["batch_sizes"], f"modeled_ms_per_step_{st['link_gbps']:g}gbps",
                 a.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
