"""SQuAD's questions from the official JSON files or the hub's columns, checked before anything is tokenised.

A file in the wrong layout, or of the other SQuAD version, fails here with the place it failed and the way
out: v1.1 data read as v2.0 would train a model that never learns to abstain, and v2.0 data read as v1.1
would crash later on questions with no answer. The official ``train-v1.1.json`` has a handful of answers
whose ``answer_start`` does not point at their text; training moves them to the nearest occurrence of the
text, or leaves the question out when the text is nowhere in its context, and says so once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning_kd.datamodules.sources import DataSourceError, read_text

logger = logging.getLogger(__name__)

LAYOUT = (
    '{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
    '"answers": [{"text", "answer_start"}], "is_impossible" (v2.0)}]}]}]}'
)
HUB_COLUMNS = ("id", "context", "question", "answers")


@dataclass(frozen=True)
class SquadExample:
    """One question: its gold answer texts and their character starts ([] when it has no answer)."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()
    title: str = ""


def _need(value: Any, kind: type | tuple[type, ...], file: Path | str, where: str, what: str) -> Any:
    if not isinstance(value, kind):
        raise DataSourceError(
            f"{file}, {where or 'the top level'}: expected {what}, found {type(value).__name__}. "
            f"SQuAD's files have the layout {LAYOUT}; pass the official train/dev JSON or a file in that layout"
        )
    return value


def _key(item: Any, key: str, kind: type | tuple[type, ...], file: Path | str, where: str, what: str) -> Any:
    _need(item, dict, file, where, "an object")
    if key not in item:
        raise DataSourceError(
            f"{file}, {where or 'the top level'}: no {key!r} key (found {sorted(item)[:8]}); expected {what} "
            f"there. SQuAD's files have the layout {LAYOUT}"
        )
    return _need(item[key], kind, file, f"{where}.{key}" if where else key, what)


def read_squad_json(path: str | os.PathLike, version_2: bool, labelled: bool = True) -> list[SquadExample]:
    """The questions of a SQuAD JSON file in the official layout.

    ``labelled=False`` (a file to predict on) allows questions without answers and skips the version checks.
    """
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file; pass a SQuAD JSON file in the layout {LAYOUT}")
    try:
        data = json.loads(read_text(path))  # with or without a byte-order mark, LF or CRLF
    except json.JSONDecodeError as error:
        raise DataSourceError(
            f"{path}: not a JSON file ({error}); SQuAD's files are one JSON object in the layout {LAYOUT}"
        ) from None
    examples: list[SquadExample] = []
    impossible_key = False
    for a, article in enumerate(_key(data, "data", list, path, "", "a list of articles")):
        where = f"data[{a}]"
        paragraphs = _key(article, "paragraphs", list, path, where, "a list of paragraphs")
        title = article.get("title", "") if isinstance(article.get("title", ""), str) else ""
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = _key(paragraph, "context", str, path, where, "the paragraph's text")
            for q, qa in enumerate(_key(paragraph, "qas", list, path, where, "a list of questions")):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qid = str(_key(qa, "id", (str, int), path, where, "the question's id"))
                question = _key(qa, "question", str, path, where, "the question's text")
                impossible_key = impossible_key or "is_impossible" in qa
                impossible = bool(qa.get("is_impossible", False))
                if "answers" in qa or labelled:
                    answers = _key(qa, "answers", list, path, where, "a list of answers")
                else:
                    answers = []
                texts, starts = [], []
                for k, answer in enumerate(answers):
                    texts.append(
                        _key(answer, "text", str, path, f"{where}.answers[{k}]", "the answer's text")
                    )
                    starts.append(
                        _key(answer, "answer_start", int, path, f"{where}.answers[{k}]", "a character index")
                    )
                if labelled and not version_2 and (impossible or not texts):
                    raise DataSourceError(
                        f"{path}, {where}: question {qid!r} has no answer"
                        f"{' (is_impossible: true)' if impossible else ''}: this is SQuAD v2.0 data: use "
                        "version v2.0 (version='v2.0'), or the v1.1 files"
                    )
                if impossible:
                    texts, starts = [], []
                examples.append(SquadExample(qid, context, question, tuple(texts), tuple(starts), title))
    if labelled and version_2 and not impossible_key:
        raise DataSourceError(
            f"{path}: no question has an 'is_impossible' key, which every question of SQuAD v2.0 has: this looks "
            "like v1.1 data: use version v1.1 (version='v1.1'), or the v2.0 files (train-v2.0.json, dev-v2.0.json)"
        )
    return _unique(examples, str(path))


def hub_examples(dataset: Any, version_2: bool, name: str) -> list[SquadExample]:
    """The questions of a hub split (columns id/title/context/question/answers{text, answer_start})."""
    columns = list(getattr(dataset, "column_names", None) or [])
    missing = [c for c in HUB_COLUMNS if c not in columns]
    if missing:
        raise DataSourceError(
            f"the hub dataset {name} lacks the columns {missing} (it has {columns}); SQuAD's hub copies "
            "(rajpurkar/squad, rajpurkar/squad_v2) have id, title, context, question and answers"
        )
    titles = dataset["title"] if "title" in columns else [""] * len(dataset)
    examples = []
    for qid, title, context, question, answers in zip(
        dataset["id"], titles, dataset["context"], dataset["question"], dataset["answers"], strict=True
    ):
        texts, starts = tuple(answers["text"]), tuple(int(s) for s in answers["answer_start"])
        if not version_2 and not texts:
            raise DataSourceError(
                f"the hub dataset {name}: question {qid!r} has no answer: this is SQuAD v2.0 data: use version "
                "v2.0 (version='v2.0', hub rajpurkar/squad_v2)"
            )
        examples.append(SquadExample(str(qid), context, question, texts, starts, title or ""))
    if version_2 and examples and all(e.answers for e in examples):
        raise DataSourceError(
            f"the hub dataset {name}: every question has an answer, which SQuAD v2.0 never has: this looks like "
            "v1.1 data: use version v1.1 (version='v1.1', hub rajpurkar/squad)"
        )
    return _unique(examples, f"the hub dataset {name}")


def _unique(examples: list[SquadExample], source: str) -> list[SquadExample]:
    # answers are gathered by id, so two questions with one id would score as one
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise DataSourceError(
                f"{source}: two questions have the id {example.id!r}; SQuAD ids are unique, give each its own"
            )
        seen.add(example.id)
    return examples


def answer_span(context: str, text: str, start: int) -> tuple[int, int] | None:
    """The character span of ``text`` in ``context``: at ``start`` when it is there, else at the occurrence
    nearest to ``start``; ``None`` when the text does not occur."""
    if context[start : start + len(text)] == text:
        return start, start + len(text)
    best = None
    found = context.find(text)
    while found >= 0:
        if best is None or abs(found - start) < abs(best - start):
            best = found
        found = context.find(text, found + 1)
    return None if best is None else (best, best + len(text))


def fix_train_answers(examples: Sequence[SquadExample], source: str) -> list[SquadExample]:
    """Training questions whose first answer's ``answer_start`` points at its text: a wrong start moves to the
    nearest occurrence of the text, a question whose answer text is not in its context is left out."""
    kept, fixed, dropped = [], [], []
    for example in examples:
        if not example.answers:
            kept.append(example)
            continue
        span = answer_span(example.context, example.answers[0], example.starts[0])
        if span is None:
            dropped.append(example.id)
            continue
        if span[0] != example.starts[0]:
            fixed.append(example.id)
            example = replace(example, starts=(span[0], *example.starts[1:]))
        kept.append(example)
    if fixed or dropped:
        logger.log(
            logging.WARNING if dropped else logging.INFO,
            "%s: %d training answers whose answer_start did not point at their text were moved to the nearest "
            "occurrence of the text (e.g. %s); %d questions whose answer text is not in their context were left "
            "out of training (e.g. %s)",
            source,
            len(fixed),
            fixed[:5],
            len(dropped),
            dropped[:5],
        )
    return kept
