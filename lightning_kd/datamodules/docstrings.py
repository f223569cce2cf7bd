"""Docstrings as an offline corpus: real English text present on every machine with Python.

The collection imports modules, which can have side effects (printing, opening a browser, starting
threads), so it runs in a child interpreter with its output discarded. The result is cached as JSON
lines under the cache dir, keyed by the Python version and the package list, and written atomically so
that several ranks or workers collecting at once never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from lightning_kd.datamodules.sources import DataSourceError
from lightning_kd.files import atomic_write

# Modules whose import does something (opens a browser, prints, needs a display), is a test suite,
# or duplicates another module's text.
_SKIP = {
    "__hello__",
    "__phello__",
    "antigravity",
    "this",
    "idlelib",
    "test",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "venv",
    "xxsubtype",
    "xxlimited",
    "sitecustomize",
    "usercustomize",
    "pip",
    "setuptools",
    "_distutils_hack",
    "distutils",
    "__main__",
    "site",
}

_COLLECTOR = r"""
import importlib, inspect, json, pkgutil, sys, warnings
warnings.simplefilter("ignore")
roots, skip, min_chars = json.loads(sys.argv[1])
seen_text = set()
records = []

def add(module_name, obj):
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return
    doc = inspect.cleandoc(doc).strip()
    if len(doc) < min_chars or doc in seen_text:
        return
    seen_text.add(doc)
    records.append({"module": module_name, "text": doc})

def visit(module):
    add(module.__name__, module)
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(module.__name__, obj)
            for attr in sorted(vars(obj)):
                if not attr.startswith("_") or attr == "__init__":
                    add(module.__name__, vars(obj)[attr])
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(module.__name__, obj)

def names_under(root):
    yield root
    try:
        module = importlib.import_module(root)
    except BaseException:
        return
    path = getattr(module, "__path__", None)
    if path is None:
        return
    found = sorted(info.name for info in pkgutil.walk_packages(path, root + ".", onerror=lambda name: None))
    for name in found:
        if not any(part.startswith("_") or part in ("test", "tests", "testing") for part in name.split(".")[1:]):
            yield name

for root in roots:
    for name in names_under(root):
        if name.split(".")[0] in skip:
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:
            continue
        visit(module)

sys.__stdout__.write(json.dumps(records))
"""


def default_cache_dir() -> Path:
    """``$LIGHTNING_KD_CACHE``, else ``$XDG_CACHE_HOME/lightning_kd``, else ``~/.cache/lightning_kd``."""
    if os.environ.get("LIGHTNING_KD_CACHE"):
        return Path(os.environ["LIGHTNING_KD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_kd"


def stdlib_roots() -> list[str]:
    return sorted(name for name in sys.stdlib_module_names if not name.startswith("_") and name not in _SKIP)


# The held-out share of the corpus for language modelling: one docstring in this many, by a hash of its text
SPLITS = ("train", "validation")
VALIDATION_SHARE = 20


def in_validation(text: str, share: int = VALIDATION_SHARE) -> bool:
    """Whether a docstring is held out: decided by its text alone, so the split is the same whatever the order
    or the machine that collected the corpus."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % share == 0


def docstrings_path(
    packages: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    min_chars: int = 40,
    split: str | None = None,
) -> Path:
    """The cached JSON-lines file of ``{"module", "text"}`` records; collected on first use.

    ``packages`` names the top-level modules to read; ``None`` or ``"stdlib"`` in it means the standard
    library. Installed packages (``"numpy"``, ``"torch"``) can be added; their versions change the text.
    ``split``: ``None`` for every docstring, in the order they were collected (module by module);
    ``"validation"`` for the held-out one in ``VALIDATION_SHARE`` (see :func:`in_validation`), ``"train"`` for the
    rest, so that a language model's perplexity is measured on text it never trained on. A split is ordered by a
    hash of each text, a fixed shuffle: a model that streams it meets every module all along, not one module
    after another (streamed module by module, the demo's tiny Llama ended at nearly twice the perplexity).
    """
    if split is not None:
        return _split_path(docstrings_path(packages, cache_dir, min_chars), split)
    roots = _roots(packages)
    key = hashlib.sha1(json.dumps([sys.version, roots, min_chars]).encode()).hexdigest()[:12]
    path = (
        Path(cache_dir or default_cache_dir())
        / f"docstrings-py{sys.version_info[0]}{sys.version_info[1]}-{key}.jsonl"
    )
    if path.exists():
        return path
    records = _collect(roots, min_chars)
    if not records:
        raise RuntimeError(f"no docstrings were found in {roots}; is Python running with -OO?")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _split_path(corpus: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataSourceError(
            f"the docstrings have no split {split!r}: use split: train or split: validation (the held-out "
            f"1/{VALIDATION_SHARE}), or no split for every docstring"
        )
    path = corpus.with_name(f"{corpus.stem}-{split}.jsonl")
    if path.exists():
        return path
    held_out = split == "validation"
    records = [record for record in read_docstrings(corpus) if in_validation(record["text"]) == held_out]
    records.sort(key=lambda record: hashlib.sha1(record["text"].encode("utf-8")).hexdigest())
    with atomic_write(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _roots(packages: list[str] | None) -> list[str]:
    roots: list[str] = []
    for name in packages or ["stdlib"]:
        for root in stdlib_roots() if name == "stdlib" else [name]:
            if root not in roots:
                roots.append(root)
    return roots


def _collect(roots: list[str], min_chars: int) -> list[dict[str, str]]:
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONWARNINGS="ignore", MPLBACKEND="Agg", DISPLAY="")
    result = subprocess.run(
        [sys.executable, "-c", _COLLECTOR, json.dumps([roots, sorted(_SKIP), min_chars])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"collecting docstrings failed (exit status {result.returncode})")
    # A module may print to the real stdout during import; the records are the last line written.
    return json.loads(result.stdout.decode("utf-8").rsplit("\n", 1)[-1].split("\x00")[-1] or "[]")


def read_docstrings(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def docstring_labels(
    records: list[dict[str, str]], num_classes: int = 6, min_per_class: int = 100
) -> list[str]:
    """The ``num_classes`` top-level packages with the most docstrings, in alphabetical order."""
    counts = Counter(record["module"].split(".")[0] for record in records)
    top = [
        name
        for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        if count >= min_per_class
    ]
    return sorted(top[:num_classes])


# The offline classification task: which standard-library package a docstring comes from. Fixed
# packages (each with 100+ docstrings in Python 3.10 to 3.13) keep the label set the same everywhere.
DOCSTRING_CLASSES = ("asyncio", "email", "logging", "multiprocessing", "unittest", "xml")


def write_docstring_task(folder: str | os.PathLike | None = None, dev_share: int = 5) -> Path:
    """train.tsv and dev.tsv (``sentence<TAB>label``, as SST-2 lays them out) for the docstrings task, and a
    test.tsv (``index<TAB>sentence``, GLUE's test layout) that holds the dev texts without their labels, so the
    whole GLUE path, predicting a test set included, runs offline.

    A docstring goes to dev when the hash of its text says so (one in ``dev_share``), so the split does not
    depend on collection order. Returns the folder; ``GLUEDataModule("docstrings", data_dir=folder)`` reads it.
    """
    records = read_docstrings(docstrings_path(["stdlib"]))
    target = (
        Path(folder)
        if folder is not None
        else default_cache_dir() / f"docstrings-task-py{sys.version_info[0]}{sys.version_info[1]}"
    )
    if all((target / name).exists() for name in ("train.tsv", "dev.tsv", "test.tsv")):
        return target
    target.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train.tsv": [], "dev.tsv": []}
    for record in records:
        label = record["module"].split(".")[0]
        if label not in DOCSTRING_CLASSES:
            continue
        text = " ".join(record["text"].split())[:2000]
        split = (
            "dev.tsv" if int(hashlib.sha1(text.encode()).hexdigest(), 16) % dev_share == 0 else "train.tsv"
        )
        rows[split].append(f"{text}\t{label}")
    headers = {"train.tsv": "sentence\tlabel", "dev.tsv": "sentence\tlabel", "test.tsv": "index\tsentence"}
    rows["test.tsv"] = [f"{i}\t{line.rsplit(chr(9), 1)[0]}" for i, line in enumerate(rows["dev.tsv"])]
    for name, lines in rows.items():
        with atomic_write(target / name, "w") as handle:
            handle.write(headers[name] + "\n" + "\n".join(lines) + "\n")
    return target
