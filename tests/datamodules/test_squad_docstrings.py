"""The offline docstrings SQuAD task: official file layout, exact spans, v2.0 flags, disjoint splits, caching."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from lightning_kd.datamodules.docstrings import default_cache_dir
from lightning_kd.datamodules.squad_docstrings import quote_of, write_docstring_squad
from lightning_kd.datamodules.squad_metrics import squad_v1_scores

SIZES = {"train_questions": 240, "dev_questions": 90}
ANSWER_KEYS = {"text", "answer_start"}


def load(folder: Path, split: str, version: str) -> dict:
    return json.loads((folder / f"{split}-{version}.json").read_text(encoding="utf-8"))


def questions(content: dict) -> list[tuple[str, dict]]:
    return [
        (p["context"], qa) for article in content["data"] for p in article["paragraphs"] for qa in p["qas"]
    ]


@pytest.fixture(scope="module", params=["v1.1", "v2.0"])
def written(request, tmp_path_factory) -> tuple[str, dict[str, dict]]:
    version = request.param
    folder = write_docstring_squad(version, tmp_path_factory.mktemp(f"squad-{version}"), **SIZES)
    return version, {split: load(folder, split, version) for split in ("train", "dev")}


def test_files_have_the_official_layout(written):
    version, files = written
    for split, content in files.items():
        assert set(content) == {"version", "data"}
        assert content["version"] == {"v1.1": "1.1", "v2.0": "v2.0"}[version]
        for article in content["data"]:
            assert set(article) == {"title", "paragraphs"} and isinstance(article["title"], str)
            for paragraph in article["paragraphs"]:
                assert set(paragraph) == {"context", "qas"} and paragraph["qas"]
        rows = questions(content)
        assert len(rows) == SIZES[f"{split}_questions"]
        for _, qa in rows:
            expected = {"id", "question", "answers"}
            if version == "v2.0":
                expected |= (
                    {"is_impossible", "plausible_answers"} if qa["is_impossible"] else {"is_impossible"}
                )
            assert set(qa) == expected
            assert all(
                set(answer) == ANSWER_KEYS for answer in qa["answers"] + qa.get("plausible_answers", [])
            )


def test_every_answer_start_points_at_its_text(written):
    _, files = written
    for content in files.values():
        for context, qa in questions(content):
            for answer in qa["answers"] + qa.get("plausible_answers", []):
                start = answer["answer_start"]
                assert (
                    isinstance(start, int) and context[start : start + len(answer["text"])] == answer["text"]
                )


def test_answers_are_the_quoted_entrys_module(written):
    version, files = written
    for split, content in files.items():
        for context, qa in questions(content):
            quote = quote_of(qa["question"])
            if qa.get("is_impossible"):
                assert quote not in context and qa["answers"] == [] and len(qa["plausible_answers"]) == 1
                continue
            # The first answer is the module name that heads the quoted entry, and the quote occurs once.
            first = qa["answers"][0]
            assert context.count(quote) == 1
            entry = context[first["answer_start"] :]
            assert entry.startswith(f"{first['text']}: {quote}")
            assert first["answer_start"] == 0 or context[first["answer_start"] - 1] == " "
            if split == "train":
                assert len(qa["answers"]) == 1
            else:
                assert len(qa["answers"]) >= 2
                # Alternatives are the module again or its top-level package, never a longer span.
                for answer in qa["answers"][1:]:
                    assert answer["text"] in (first["text"], first["text"].split(".")[0])


def test_dev_offers_the_top_level_package_of_a_dotted_module(written):
    _, files = written
    dotted = [qa for _, qa in questions(files["dev"]) if qa["answers"] and "." in qa["answers"][0]["text"]]
    assert dotted
    for qa in dotted:
        assert qa["answers"][0]["text"].split(".")[0] in [answer["text"] for answer in qa["answers"][1:]]


def test_ids_are_unique_and_train_and_dev_ask_different_questions(written):
    _, files = written
    ids = [qa["id"] for content in files.values() for _, qa in questions(content)]
    assert len(ids) == len(set(ids))
    train, dev = ({quote_of(qa["question"]) for _, qa in questions(files[s])} for s in ("train", "dev"))
    assert train and dev and not train & dev
    # Dev contexts are made of dev sentences only: no train quote appears in them.
    dev_contexts = " ".join(context for context, _ in questions(files["dev"]))
    assert not any(quote in dev_contexts for quote in train)


def test_v2_has_about_a_third_unanswerable(written):
    version, files = written
    for content in files.values():
        flags = [qa.get("is_impossible") for _, qa in questions(content)]
        if version == "v1.1":
            assert flags == [None] * len(flags)
        else:
            assert 0.2 < sum(flags) / len(flags) < 0.45


def test_gold_answers_score_full_marks_with_the_official_metric(written):
    _, files = written
    golds = {
        qa["id"]: [a["text"] for a in qa["answers"]] for _, qa in questions(files["dev"]) if qa["answers"]
    }
    predictions = {qid: answers[0] for qid, answers in golds.items()}
    assert squad_v1_scores(predictions, golds) == {"exact_match": 100.0, "f1": 100.0}


def test_some_contexts_need_several_windows_and_some_fit_one(written, tokenizer):
    _, files = written
    lengths = [
        len(tokenizer(qa["question"], context)["input_ids"]) for context, qa in questions(files["dev"])
    ]
    long = sum(length > 128 for length in lengths) / len(lengths)
    assert 0.25 < long < 0.9
    assert max(len(tokenizer(qa["question"])["input_ids"]) for _, qa in questions(files["dev"])) < 64


def test_same_bytes_from_fresh_folders_and_a_second_call_reuses_the_files(tmp_path):
    first = write_docstring_squad("v2.0", tmp_path / "a", **SIZES)
    second = write_docstring_squad("v2.0", tmp_path / "b", **SIZES)
    for name in ("train-v2.0.json", "dev-v2.0.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    stamps = {name: (first / name).stat().st_mtime_ns for name in ("train-v2.0.json", "dev-v2.0.json")}
    assert write_docstring_squad("v2.0", first, **SIZES) == first
    assert {name: (first / name).stat().st_mtime_ns for name in stamps} == stamps
    # Other arguments in the same folder rewrite the files rather than reuse ones of the wrong size.
    write_docstring_squad("v2.0", first, train_questions=30, dev_questions=12)
    assert len(questions(load(first, "dev", "v2.0"))) == 12
    # Another seed gives other questions.
    other = write_docstring_squad("v2.0", tmp_path / "c", seed=1, **SIZES)
    assert (other / "dev-v2.0.json").read_bytes() != (second / "dev-v2.0.json").read_bytes()


def test_default_folder_is_in_the_cache_and_keyed_by_the_arguments():
    folder = write_docstring_squad("v1.1", train_questions=30, dev_questions=12)
    assert folder.parent == default_cache_dir()
    assert write_docstring_squad("v1.1", train_questions=30, dev_questions=12) == folder
    assert write_docstring_squad("v1.1", train_questions=30, dev_questions=13) != folder
    assert write_docstring_squad("v2.0", train_questions=30, dev_questions=12) != folder


def _write_and_hash(folder: str) -> str:
    path = write_docstring_squad("v2.0", folder, train_questions=600, dev_questions=200)
    # json.loads fails on a half-written file.
    return hashlib.sha1(json.dumps([load(path, s, "v2.0") for s in ("train", "dev")]).encode()).hexdigest()


def test_processes_writing_at_once_all_read_whole_files(tmp_path):
    context = multiprocessing.get_context("fork")
    with context.Pool(3) as pool:
        digests = pool.map(_write_and_hash, [str(tmp_path / "shared")] * 6)
    assert len(set(digests)) == 1
    assert not [p.name for p in (tmp_path / "shared").iterdir() if p.name.endswith(".tmp")]


def test_an_unknown_version_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'v1.1' or 'v2.0'"):
        write_docstring_squad("2.0", tmp_path)
