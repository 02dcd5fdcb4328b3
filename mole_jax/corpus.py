"""The embedded default corpus: the English documentation every Python installation carries, so that training,
the quickstart and the benchmarks have real text with no download: the language reference's topics
(pydoc_data.topics) and the standard library's module, class and function docstrings of 200+ characters (parsed
with `ast`, never imported). Deterministic for a given Python installation."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

_DEFAULT_CORPUS_VERSION = 1  # bump when the extraction below changes: it names the cached file


@functools.cache
def default_documents() -> tuple[str, ...]:
    """The default corpus's ~1.6 M characters, one string per document. Parsing the whole standard library takes
    seconds in every process, so the documents are kept as JSON in the user's cache directory ($MOLE_JAX_CACHE,
    else $XDG_CACHE_HOME/mole-jax or ~/.cache/mole-jax), named by the Python installation; a missing, damaged or
    unwritable cache only means parsing again."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{_DEFAULT_CORPUS_VERSION} {sys.version} {root}".encode()).hexdigest()[:16]
    cached = _cache_dir() / f"default-corpus-{key}.json"
    try:
        docs = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
            return tuple(docs)
    except (OSError, ValueError):
        pass
    docs = _parse_default_documents(root)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(tmp, cached)  # whole or absent: concurrent processes write the same bytes
    except OSError:
        pass
    return docs


def _cache_dir() -> Path:
    if os.environ.get("MOLE_JAX_CACHE"):
        return Path(os.environ["MOLE_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mole-jax"


def _parse_default_documents(root: Path) -> tuple[str, ...]:
    docs = [topics[k] for k in sorted(topics)]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    for f in sorted(root.rglob("*.py")):
        if skip.intersection(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc)
    return tuple(docs)
