"""Every figure the README and docs/*.md quote from a results file agrees with that file.

The convention the docs follow (and this check enforces):
- A table quotes figures from the results/*.json files linked in the paragraph directly above it (its caption) or
  in the table itself: every number in its body cells, the first column (the row's label) excepted, must be found
  in one of those files.
- A sentence that links a results/*.json file quotes figures from it: every number in the sentence must be found
  there. Numbers inside `code` (commands, names, settings) and in link targets are not figures.
- "Found" means: some number in the file (a value, a numeric key, or a number written inside a string), possibly in
  the unit the text gives or its table column's header gives (% of a fraction, MiB/GiB/KiB of bytes, MB/GB, ms of
  seconds, GFLOP/s and GB/s of per-second values), rounds to the printed number at its printed precision. Numbers
  listed as "x / y / z" (one measurement at several settings) must also stand in that order in one group of the
  file (a dict's values, or one key across a list's rows, at equal steps), so a swapped or borrowed value fails.
Every results/ path the docs name must exist, and every relative link must resolve to a file inside the repository.

Run as a script (`python tests/test_figures.py`) it prints each disagreement.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RESULTS_JSON = re.compile(r"(?:\.\./)?(results/[\w.\-/]+?\.json)\b")
RESULTS_ANY = re.compile(r"(?:\.\./)?(results/[\w.\-/]*\w\.\w+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
NUMBER = re.compile(
    r"(?<![\w.])(?<![A-Za-z]-)([+\-−])?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:[eE]([+\-]?\d+))?"
    r"(?!\d)(?![.,]\d)(?!(?!x\b)[A-Za-z])(\s?(?:%|MiB|GiB|KiB|MB|GB/s|GB|KB|kB|ms|GFLOP/s|TFLOP/s|s\b))?")
HEADER_UNIT = re.compile(r"(GFLOP/s|TFLOP/s|MiB|GiB|KiB|MB|GB|ms|%)(?![\w/])")  # a table column's unit
# the unit after a printed number -> the scales a file's value may be printed at (the value itself always counts)
UNIT_SCALES = {"%": (100.0,), "MiB": (2.0 ** -20,), "GiB": (2.0 ** -30,), "KiB": (2.0 ** -10,), "KB": (1e-3, 2.0 ** -10),
               "kB": (1e-3, 2.0 ** -10), "MB": (1e-6, 2.0 ** -20), "GB": (1e-9, 2.0 ** -30), "GB/s": (1e-9,),
               "ms": (1e3,), "s": (1e-3,), "GFLOP/s": (1e-9,), "TFLOP/s": (1e-12,)}


@functools.lru_cache(maxsize=None)
def file_numbers(path: Path) -> tuple[float, ...]:
    """Every number in a JSON file: values, numeric keys, and numbers written inside strings."""
    found: list[float] = []
    plain = re.compile(r"[+\-]?\d+(?:\.\d+)?(?:[eE][+\-]?\d+)?")

    def walk(x):
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, (int, float)):
            if math.isfinite(x):
                found.append(float(x))
        elif isinstance(x, str):
            found.extend(float(m.replace(",", "")) for m in plain.findall(x.replace(",", "")))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(path.read_text()))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def file_groups(path: Path) -> tuple[tuple[float, ...], ...]:
    """The numbers of a JSON file that belong together: a dict's own numeric values, a list's numeric items, and one
    key's values across the dicts of a list or of a dict (e.g. one measurement at every batch size)."""
    groups: list[tuple[float, ...]] = []

    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def walk(x):
        children = list(x.values()) if isinstance(x, dict) else x if isinstance(x, list) else []
        if not children:
            return
        groups.append(tuple(float(v) for v in children if num(v)))
        dicts = [c for c in children if isinstance(c, dict)]
        for key in {k for d in dicts for k in d}:
            groups.append(tuple(float(d[key]) for d in dicts if num(d.get(key))))
        for c in children:
            walk(c)

    walk(json.loads(path.read_text()))
    return tuple(g for g in groups if len(g) > 1)


def figures(text: str, unit_default: str = "") -> list[tuple[str, float, float, str, int]]:
    """The numbers a piece of text quotes: (as printed, value, half a unit of its last printed digit, unit, run); a
    number printed without a unit takes `unit_default` (a table column's, from its header). Numbers listed with
    " / " between them ("1.02 / 0.97 / 0.99 ms": one measurement at several settings) share a run number."""
    text = re.sub(r"`[^`]*`", " ", text)  # code: commands, names, settings
    text = LINK.sub(" ", text)  # link targets
    text = RESULTS_ANY.sub(" ", text)  # paths named in the text
    text = re.sub(r"\b\d{4}-\d{2}-\d{2}\b", " ", text)  # dates
    out = []
    matches = list(NUMBER.finditer(text))
    units = [m.group(5) or "" for m in matches]
    for i in range(len(matches) - 2, -1, -1):  # "1,506 / 1,539 MiB": a unit covers the numbers listed before it
        if not units[i] and re.fullmatch(r"\s*/\s*", text[matches[i].end():matches[i + 1].start()]):
            units[i] = units[i + 1]
    runs = [0] * len(matches)
    for i in range(1, len(matches)):
        joined = re.fullmatch(r"\s*/\s*", text[matches[i - 1].end():matches[i].start()]) is not None
        runs[i] = runs[i - 1] if joined else runs[i - 1] + 1
    for m, unit, run in zip(matches, units, runs):
        unit = unit.strip() or unit_default
        sign, whole, frac, exp, _ = m.groups()
        start = m.start()
        if sign == "-" and start > 0 and text[start - 1].isdigit():  # a range, 1.5-2.3: not a minus sign
            sign = None
        value = float(whole.replace(",", "") + (frac or ""))
        decimals = len(frac) - 1 if frac else 0
        half = 0.5 * 10.0 ** -decimals
        if exp is not None:
            value *= 10.0 ** int(exp)
            half *= 10.0 ** int(exp)
        if sign in ("-", "−"):
            value = -value
        out.append((m.group(0).strip(), value, half, unit, run))
    return out


def unmatched(quoted: list[tuple[str, float, float, str, int]], sources: list[Path]) -> list[str]:
    """The figures of `quoted` that `sources` do not hold; a run of several (x / y / z) must be consecutive items of
    one group of one file (file_groups), in the order printed, not merely each somewhere in it."""
    numbers = tuple(n for p in sources for n in file_numbers(p))
    groups = tuple(g for p in sources for g in file_groups(p))
    bad = [shown for shown, value, half, unit, _ in quoted if not found(value, half, unit, numbers)]
    for run in sorted({q[4] for q in quoted}):
        members = [q for q in quoted if q[4] == run]
        if len(members) > 1 and not any(q[0] in bad for q in members) and not any(
                together(members, g) for g in groups):
            bad.append(" / ".join(q[0] for q in members) + " (not in this order in one group)")
    return bad


def together(members: list[tuple[str, float, float, str, int]], group: tuple[float, ...]) -> bool:
    """Whether the run's numbers are items of the group at equal steps (consecutive, or one every k items: a list of
    rows ordered by setting, then model), in the order printed."""
    n = len(members)
    return any(all(found(value, half, unit, (group[i + j * k],)) for j, (_, value, half, unit, _) in enumerate(members))
               for k in range(1, len(group)) for i in range(len(group) - (n - 1) * k))


def found(value: float, half: float, unit: str, numbers: tuple[float, ...]) -> bool:
    scales = (1.0, *UNIT_SCALES.get(unit, ()))
    tol = half * (1 + 1e-9) + 1e-12 * abs(value)
    return any(abs(n * s - value) <= tol for n in numbers for s in scales)


def _blocks(text: str):
    """(first line number, lines) of each block of a markdown text: paragraphs, tables, list items; fenced code is
    skipped (it holds commands and sample output)."""
    block: list[str] = []
    start = 0
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if block:
                yield start, block
            block = []
            continue
        if fenced:
            continue
        is_table = line.lstrip().startswith("|")
        new_item = re.match(r"\s*(?:[-*]|\d+\.)\s", line) is not None
        if not line.strip() or (block and (is_table != block[-1].lstrip().startswith("|") or new_item)):
            if block:
                yield start, block
            block = []
        if line.strip():
            if not block:
                start = i
            block.append(line)
    if block:
        yield start, block


def _sources(text: str, root: Path) -> list[Path]:
    return [root / p for p in dict.fromkeys(RESULTS_JSON.findall(text))]


def problems(text: str, name: str = "doc", root: Path = ROOT) -> list[str]:
    """Each figure of `text` that its results file does not hold, and each named results file that is missing."""
    out = []
    for path in dict.fromkeys(RESULTS_ANY.findall(text)):
        if not (root / path).is_file():
            out.append(f"{name}: {path} does not exist")
    previous: list[str] = []
    for line_no, block in _blocks(text):
        if block[0].lstrip().startswith("|"):
            sources = [p for p in _sources("\n".join(previous + block), root) if p.is_file()]
            if sources:
                header = [HEADER_UNIT.search(h) for h in block[0].strip().strip("|").split("|")]
                for k, row in enumerate(block[2:], line_no + 2):  # the header and its rule are not figures
                    cells = row.strip().strip("|").split("|")
                    for j, cell in enumerate(cells[1:], 1):
                        unit = header[j].group(1) if j < len(header) and header[j] else ""
                        for shown in unmatched(figures(cell, unit), sources):
                            out.append(f"{name}:{k}: {shown!r} is not in {', '.join(p.name for p in sources)}")
        else:
            paragraph = " ".join(s.strip() for s in block)
            for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z(*\[])", paragraph):
                sources = [p for p in _sources(sentence, root) if p.is_file()]
                if not sources:
                    continue
                for shown in unmatched(figures(sentence), sources):
                    out.append(f"{name}:{line_no}: {shown!r} is not in {', '.join(p.name for p in sources)} "
                               f"({sentence[:80]}...)")
        previous = block
    return out


def link_problems(doc: Path) -> list[str]:
    """Relative links that point at nothing, or outside the repository."""
    out = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT):
            out.append(f"{doc.name}: link {target} leaves the repository")
        elif not path.exists():
            out.append(f"{doc.name}: link {target} points at nothing")
    return out


def test_every_quoted_figure_agrees_with_its_results_file():
    bad = [p for doc in DOCS for p in problems(doc.read_text(), doc.relative_to(ROOT).as_posix())]
    assert not bad, "\n".join(bad)


def test_the_docs_quote_figures_from_results_files():
    """The check has something to check: tables and sentences that cite results files, in README and docs."""
    cited = {doc.name: len(RESULTS_JSON.findall(doc.read_text())) for doc in DOCS}
    assert cited["README.md"] >= 5 and sum(cited.values()) >= 20, cited


def test_links_resolve_inside_the_repository():
    bad = [p for doc in DOCS for p in link_problems(doc)]
    assert not bad, "\n".join(bad)


def test_the_papers_tables_are_in_the_repository_and_cited():
    """The paper's published accuracies, which the experiment reports print beside the measured figures, are read by
    default from a file inside the repository that cites the paper."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from lab import cli

    path = Path(cli.PAPER_TABLES).resolve()
    assert path == ROOT / "experiments" / "paper_tables.json" and path.is_file()
    tables = json.loads(path.read_text())
    source = tables["source"]
    assert source["title"] == "Mixture of Lookup Experts" and source["arxiv"] == "2503.15798"
    assert "ICML 2025" in source["venue"] and source["authors"].startswith("Shibo Jie")
    # spot values of the published tables (Table 3's averages, Table 6, Table 8) as the docs quote them
    assert [tables["table3_main"]["160M"][m]["AVG"] for m in ("Dense", "MoE-10E", "MoLE-4E", "MoE-34E", "MoLE-16E")] \
        == [38.8, 40.3, 40.8, 41.8, 41.9]
    assert [tables["table6_num_experts_160M"][n]["AVG"] for n in ("2", "4", "8", "16", "32")] \
        == [39.7, 40.8, 41.1, 41.9, 42.3]
    assert [tables["table8_lut_quantization_160M_MoLE4E"][k]["AVG"] for k in ("FP16", "NF4", "NF3")] == [40.8, 40.9, 40.5]


def test_a_figure_changed_by_hand_is_reported(tmp_path):
    """A copy of README with one table figure and one sentence figure altered fails the check, naming each."""
    readme = (ROOT / "README.md").read_text()
    assert not problems(readme, "README.md")
    table_fig, prose_fig = "5.0898", "1.0002x"  # MoLE-4E's validation loss (a table); the device memory (a sentence)
    assert readme.count(table_fig) >= 1 and readme.count(prose_fig) == 1
    altered = readme.replace(table_fig, "5.0998", 1)
    bad = problems(altered, "README.md")
    assert len(bad) == 1 and "'5.0998'" in bad[0], bad
    altered = readme.replace(prose_fig, "1.0102x")
    bad = problems(altered, "README.md")
    assert len(bad) == 1 and "'1.0102'" in bad[0], bad
    # a row of one measurement at batch 1 / 8 / 32: each value is somewhere in the file, but not in this order
    decoding = (ROOT / "docs" / "decoding.md").read_text()
    assert not problems(decoding, "decoding.md")
    row, swapped = "| `mole-device` | 1.00 / 0.92 / 1.01 |", "| `mole-device` | 1.00 / 1.01 / 0.92 |"
    assert decoding.count(row) == 1
    bad = problems(decoding.replace(row, swapped), "decoding.md")
    assert len(bad) == 1 and "'1.00 / 1.01 / 0.92 (not in this order in one group)'" in bad[0], bad


def test_the_check_itself(tmp_path):
    """The rules on a small document: rounding to the printed precision, units, ranges, code and labels exempt,
    a missing file named."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text(json.dumps(
        {"rows": [{"model": "dense", "ms": 33.46, "ratio": 1.0349, "bytes": 3 * 2 ** 20, "frac": 0.523},
                  {"model": "mole", "ms": 1456.3, "delta": -0.04127, "s": 2.24, "note": "peak 208.4 GF"}],
         "by_batch": {"1": 0.91, "8": 0.97, "32": 1.12}}))
    ok = ("Caption ([r.json](results/r.json)).\n\n| model | ms | x |\n|---|---|---|\n"
          "| dense 160M, 1 | 33.5 | 1.03x |\n| mole | 1,456 | -0.0413 |\n| by batch | 0.91 / 0.97 / 1.12 | |\n\n"
          "It takes 3.0 MiB, 52% of the peak (208 GFLOP/s), 2,240 ms, 1.0-1.03x with `--steps 64` "
          "([results/r.json](results/r.json)). Unlinked 9.99 is not checked.\n")
    assert problems(ok, root=tmp_path) == []
    wrong = ok.replace("33.5", "33.6").replace("52%", "53%").replace("-0.0413", "0.0413")
    bad = problems(wrong, root=tmp_path)
    assert len(bad) == 3 and all(any(f"'{v}'" in b for b in bad) for v in ("33.6", "53%", "0.0413")), bad
    assert problems("See results/none.json.", root=tmp_path) == ["doc: results/none.json does not exist"]
    bad = problems(ok.replace("0.91 / 0.97 / 1.12", "0.97 / 0.91 / 1.12"), root=tmp_path)  # each in the file, reordered
    assert len(bad) == 1 and "(not in this order in one group)" in bad[0], bad


if __name__ == "__main__":
    bad = [p for doc in DOCS for p in problems(doc.read_text(), doc.relative_to(ROOT).as_posix())]
    bad += [p for doc in DOCS for p in link_problems(doc)]
    print("\n".join(bad) or "every quoted figure agrees with its file")
    sys.exit(1 if bad else 0)
