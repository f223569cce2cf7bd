"""An offline extractive question-answering task in SQuAD's file layout, made from standard-library docstrings.

Each context lists several entries ``"<module>: <first sentence of one of its docstrings>"``; a question quotes
the start of one entry's sentence and asks which module says it; the answer is that entry's module name, a real
span of the context. Contexts hold 3 to 12 entries, so with ``max_length=128`` short ones fit one window and
long ones need two or three, which exercises the striding and window selection of a SQuAD pipeline.

The files follow the official layout, so whatever reads ``train-v1.1.json`` / ``dev-v2.0.json`` reads these:

- ``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``; the real v1.1 files say
  ``"version": "1.1"`` (the v1.1 evaluation script compares against that string), the v2.0 ones ``"v2.0"``.
- A train question has one answer; a dev question has several (in the real dev files, the answers of several
  crowd workers, often the same span more than once). The official scripts score a prediction against every
  gold answer and keep the best, after lower-casing and removing punctuation, articles and extra spaces.
  Here the alternatives are the top-level package of a dotted name (``email`` for ``email.mime``), other
  entries of the same module, or else the same span again.
- v2.0 marks every question with ``is_impossible``; an impossible one has ``answers: []`` and
  ``plausible_answers`` (a span that looks like an answer but is not one). The v2.0 script scores an impossible
  question's gold as the empty string, so only an empty prediction matches it. About a third of the questions
  here are impossible: they quote a sentence that is not in their context.

Train and dev draw their sentences from disjoint pools (by a hash of the sentence, as ``write_docstring_task``
splits), so no dev question is a train question. Everything is seeded, so the same Python (same docstrings)
gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_kd.datamodules.docstrings import default_cache_dir, docstrings_path, read_docstrings
from lightning_kd.files import atomic_write

SQUAD_DOCSTRING_VERSIONS = ("v1.1", "v2.0")
# The "version" field of the real files.
_FILE_VERSION = {"v1.1": "1.1", "v2.0": "v2.0"}
# Bumped whenever the generator's output changes, so a cached folder from an older layout is not reused.
_REVISION = 1

MIN_ENTRIES = 3
MAX_ENTRIES = 12
QUESTIONS_PER_CONTEXT = 3
PARAGRAPHS_PER_ARTICLE = 5
UNANSWERABLE_SHARE = 1 / 3
# A question quotes at most this many words of its sentence: enough to pick one entry, short enough to keep
# the question well under the 64 tokens SQuAD pipelines usually allow a question.
QUOTE_WORDS = 10

_QUESTIONS = (
    'Which module\'s documentation says "{quote}"?',
    'Which module is documented with the words "{quote}"?',
    'In which module does a docstring begin "{quote}"?',
    'Where in the standard library does it say "{quote}"?',
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# A first line such as "dumps(obj, protocol=None)" is a signature, not a sentence.
_SIGNATURE = re.compile(r"^\S*\(")


@dataclass(frozen=True)
class DocSentence:
    """The first sentence of one docstring, the module it documents, and the words a question quotes."""

    module: str
    sentence: str
    quote: str


def quote_of(question: str) -> str:
    """The sentence start a question quotes (between its first and last double quote)."""
    return question[question.index('"') + 1 : question.rindex('"')]


def docstring_sentences(records: Sequence[dict[str, str]]) -> list[DocSentence]:
    """First sentences that make fair questions: plain ASCII prose of 4 to 30 words, each naming one module.

    A sentence found under two modules, or whose quote another sentence shares, would make a question with
    two right answers, so both are left out.
    """
    found: list[DocSentence] = []
    for record in records:
        paragraph = " ".join(record["text"].split("\n\n", 1)[0].split())
        end = _SENTENCE_END.search(paragraph)
        if end is None:
            continue
        sentence = paragraph[: end.end()]
        words = sentence.split()
        if not (4 <= len(words) <= 30) or not sentence.isascii() or not sentence[0].isalpha():
            continue
        if _SIGNATURE.match(sentence) or any(mark in sentence for mark in ("->", ">>>", '"')):
            continue
        found.append(DocSentence(record["module"], sentence, " ".join(words[:QUOTE_WORDS])))
    modules: dict[str, set[str]] = {}
    quotes: dict[str, int] = {}
    for item in found:
        modules.setdefault(item.sentence, set()).add(item.module)
        quotes[item.quote] = quotes.get(item.quote, 0) + 1
    kept: dict[str, DocSentence] = {}
    for item in found:
        if len(modules[item.sentence]) == 1 and quotes[item.quote] == 1:
            kept.setdefault(item.sentence, item)
    return list(kept.values())


def split_sentences(sentences: Sequence[DocSentence], dev_share: int = 5) -> dict[str, list[DocSentence]]:
    """``{"train", "dev"}``: a sentence goes to dev when its hash says so (one in ``dev_share``)."""
    if dev_share < 2:
        raise ValueError(
            f"dev_share must be 2 or more (one sentence in dev_share goes to dev), got {dev_share}"
        )
    pools: dict[str, list[DocSentence]] = {"train": [], "dev": []}
    for item in sentences:
        digest = int(hashlib.sha1(item.sentence.encode()).hexdigest(), 16)
        pools["dev" if digest % dev_share == 0 else "train"].append(item)
    return pools


def build_docstring_squad(
    pool: Sequence[DocSentence], version: str, split: str, questions: int, seed: int = 0
) -> dict[str, Any]:
    """One SQuAD file's content (``split`` "train" or "dev") with ``questions`` questions drawn from ``pool``."""
    _check_version(version)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if questions < 1:
        raise ValueError(f"questions must be at least 1, got {questions}")
    if len(pool) < 2 * MAX_ENTRIES:
        raise ValueError(
            f"only {len(pool)} usable sentences for {split}; a context needs up to {MAX_ENTRIES} and an "
            f"unanswerable question one more: use a Python with its docstrings (not -OO) or a smaller dev_share"
        )
    rng = random.Random(f"{seed}/{version}/{split}")
    quoted = _cycle(len(pool), rng)
    paragraphs: list[dict[str, Any]] = []
    made = 0
    while made < questions:
        slots = min(QUESTIONS_PER_CONTEXT, questions - made)
        impossible = [version == "v2.0" and rng.random() < UNANSWERABLE_SHARE for _ in range(slots)]
        size = rng.randint(MIN_ENTRIES, MAX_ENTRIES)
        asked = _distinct(quoted, slots - sum(impossible), set())
        while True:
            others = [i for i in rng.sample(range(len(pool)), size + len(asked)) if i not in asked]
            entries = asked + others[: size - len(asked)]
            rng.shuffle(entries)
            context, heads = _context([pool[i] for i in entries])
            # Another entry quoting the asked words mid-sentence would make the question point at two places.
            if all(context.count(pool[i].quote) == 1 for i in asked):
                break
        qas = []
        answerable = iter(asked)
        for slot, is_impossible in enumerate(impossible):
            qid = hashlib.sha1(f"{version}/{split}/{seed}/{len(paragraphs)}/{slot}".encode()).hexdigest()[:24]
            template = rng.choice(_QUESTIONS)
            if is_impossible:
                target = _absent(quoted, pool, context)
                item = pool[target]
                qa: dict[str, Any] = {"id": qid, "question": template.format(quote=item.quote), "answers": []}
                lookalike = _lookalike(item, [pool[i] for i in entries], rng)
                qa["is_impossible"] = True
                qa["plausible_answers"] = [
                    {"text": pool[entries[lookalike]].module, "answer_start": heads[lookalike]}
                ]
            else:
                position = entries.index(next(answerable))
                item = pool[entries[position]]
                qa = {"id": qid, "question": template.format(quote=item.quote)}
                qa["answers"] = _answers(item, position, [pool[i] for i in entries], heads, split == "dev")
                if version == "v2.0":
                    qa["is_impossible"] = False
            qas.append(qa)
        paragraphs.append({"context": context, "qas": qas})
        made += slots
    data = [
        {
            "title": f"Python_docstrings_{split}_{start // PARAGRAPHS_PER_ARTICLE:03d}",
            "paragraphs": paragraphs[start : start + PARAGRAPHS_PER_ARTICLE],
        }
        for start in range(0, len(paragraphs), PARAGRAPHS_PER_ARTICLE)
    ]
    return {"version": _FILE_VERSION[version], "data": data}


def write_docstring_squad(
    version: str = "v1.1",
    folder: str | os.PathLike | None = None,
    train_questions: int = 2000,
    dev_questions: int = 300,
    seed: int = 0,
    dev_share: int = 5,
) -> Path:
    """Returns a folder holding ``train-<version>.json`` and ``dev-<version>.json`` (version "v1.1" or "v2.0").

    Without ``folder`` the files go under the cache dir, in a folder keyed by the docstrings collection and the
    arguments. Files already there for the same key are reused; both are written atomically, so processes
    writing at once (DDP ranks) write the same bytes and a reader never sees half a file.
    """
    _check_version(version)
    path = docstrings_path(["stdlib"])
    key = hashlib.sha1(
        json.dumps([path.name, version, train_questions, dev_questions, seed, dev_share, _REVISION]).encode()
    ).hexdigest()[:12]
    target = Path(folder) if folder is not None else default_cache_dir() / f"docstrings-squad-{version}-{key}"
    names = {"train": f"train-{version}.json", "dev": f"dev-{version}.json"}
    # The key beside the files says which arguments made them: a folder made with other sizes is rewritten.
    stamp = target / f".docstrings-squad-{version}.key"
    if stamp.exists() and stamp.read_text() == key and all((target / n).exists() for n in names.values()):
        return target
    pools = split_sentences(docstring_sentences(read_docstrings(path)), dev_share)
    target.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_questions), ("dev", dev_questions)):
        content = build_docstring_squad(pools[split], version, split, count, seed)
        with atomic_write(target / names[split], "w") as handle:
            json.dump(content, handle, ensure_ascii=False)
    with atomic_write(stamp, "w") as handle:
        handle.write(key)
    return target


def _check_version(version: str) -> None:
    if version not in SQUAD_DOCSTRING_VERSIONS:
        raise ValueError(
            f"unknown SQuAD version {version!r}: use 'v1.1' or 'v2.0' (with unanswerable questions)"
        )


def _cycle(size: int, rng: random.Random) -> Iterator[int]:
    """Every index once in a shuffled order, then again in a new order: quotes repeat only when exhausted."""
    while True:
        order = list(range(size))
        rng.shuffle(order)
        yield from order


def _distinct(indices: Iterator[int], count: int, taken: set[int]) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        index = next(indices)
        if index not in taken and index not in chosen:
            chosen.append(index)
    return chosen


def _absent(indices: Iterator[int], pool: Sequence[DocSentence], context: str) -> int:
    """The next quoted sentence whose quote the context does not contain anywhere."""
    for _ in range(3 * len(pool)):
        index = next(indices)
        if pool[index].quote not in context:
            return index
    raise RuntimeError("every sentence's quote occurs in one context; the pool is too small for v2.0")


def _context(entries: Sequence[DocSentence]) -> tuple[str, list[int]]:
    """The entries joined by spaces, and where each entry's module name starts."""
    parts: list[str] = []
    heads: list[int] = []
    offset = 0
    for item in entries:
        heads.append(offset)
        part = f"{item.module}: {item.sentence}"
        parts.append(part)
        offset += len(part) + 1
    return " ".join(parts), heads


def _answers(
    item: DocSentence, position: int, entries: Sequence[DocSentence], heads: Sequence[int], several: bool
) -> list[dict[str, Any]]:
    answers = [{"text": item.module, "answer_start": heads[position]}]
    if not several:
        return answers
    package = item.module.split(".")[0]
    if package != item.module:
        answers.append({"text": package, "answer_start": heads[position]})
    for other, entry in enumerate(entries):
        if other != position and entry.module == item.module:
            answers.append({"text": item.module, "answer_start": heads[other]})
    if len(answers) == 1:
        answers.append(dict(answers[0]))
    return answers


def _lookalike(item: DocSentence, entries: Sequence[DocSentence], rng: random.Random) -> int:
    """An entry whose module a reader could take for the answer: same package as the quoted one, if any."""
    package = item.module.split(".")[0]
    same = [i for i, entry in enumerate(entries) if entry.module.split(".")[0] == package]
    return same[0] if same else rng.randrange(len(entries))
