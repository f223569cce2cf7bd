"""SQuADDataModule: windows, span labels and offsets over a grid of window sizes and three tokenizer families,
the round trip through the post-processing to perfect scores, the hub path, and every bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from kd_datafiles import TOKENIZER
from squad_tokenizers import deberta_style_tokenizer, roberta_style_tokenizer
from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules import squad
from lightning_kd.datamodules.sources import DataSourceError
from lightning_kd.datamodules.squad import SQuADDataModule, get_squad_task, truncated_questions
from lightning_kd.datamodules.squad_metrics import normalize_answer, squad_v1_scores, squad_v2_scores
from lightning_kd.datamodules.squad_postprocess import postprocess
from lightning_kd.hub import load_tokenizer

CONTEXTS = [
    "The Normans  were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
    "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who swore "
    "fealty to King Charles III of West Francia. The café in Zürich served crème brûlée to naïve tourists in "
    "1995 and again in 2004.   Seven wizards quietly box jovial zebras near rivers and mountains.",
    "Tesla was born on 10 July 1856 in the village of Smiljan,  within the Military Frontier of the Austrian "
    "Empire.\nHow many algorithms of complexity theory did he know? Which year? Nobody can say; the quick "
    "brown fox jumps over a lazy dog while Tesla worked on computation.",
    "Short paragraph about Iceland.",
]
# (context, question, gold answers; the first is the one training labels), answerable questions
ANSWERABLE = [
    (0, "Who gave their name to Normandy?", ["The Normans", "Normans"]),
    (0, "  In what country is Normandy located?", ["France"]),
    (0, "Where was the café?", ["Zürich"]),
    (0, "What was served to naïve tourists?", ["crème brûlée", "crème brûlée to naïve tourists"]),
    (0, "Who box jovial zebras near rivers?", ["Seven wizards"]),
    (0, "Near what do the zebras live?", ["rivers and mountains"]),
    (0, "When did tourists eat in Zürich?", ["1995", "in 1995"]),
    (
        1,
        "When was Tesla born? " + "Which year, which month, which day, in what village and country? " * 3,
        ["1856"],
    ),
    (1, "Where was Tesla born?", ["Smiljan"]),
    (1, "What did Tesla work on?", ["computation"]),
    (2, "About what is the short paragraph?", ["Iceland"]),
]
UNANSWERABLE = [
    (0, "Who gave their name to Iceland?", ["The Normans"]),
    (1, "When did Tesla die?", ["1856"]),
]
WORDPIECE = "wordpiece"


def squad_json(version_2: bool, dev: bool, bad: dict[str, str] | None = None) -> dict[str, Any]:
    """The official layout; train has one answer a question, dev all of them; v2.0 adds unanswerable ones
    (answers [], plausible_answers) and an ``is_impossible`` key on every question."""
    paragraphs: list[dict[str, Any]] = [{"context": c, "qas": []} for c in CONTEXTS]
    for number, (c, question, golds) in enumerate(ANSWERABLE):
        texts = golds if dev else golds[:1]
        # starts point at the first occurrence, "in 1995" included: tests the start, not the text
        answers = [{"text": t, "answer_start": CONTEXTS[c].index(t)} for t in texts]
        qa: dict[str, Any] = {"id": f"q{number}", "question": question, "answers": answers}
        if version_2:
            qa["is_impossible"] = False
        paragraphs[c]["qas"].append(qa)
    if version_2:
        for number, (c, question, golds) in enumerate(UNANSWERABLE):
            plausible = [{"text": t, "answer_start": CONTEXTS[c].index(t)} for t in golds]
            paragraphs[c]["qas"].append(
                {
                    "id": f"n{number}",
                    "question": question,
                    "answers": [],
                    "plausible_answers": plausible,
                    "is_impossible": True,
                }
            )
    return {"version": "v2.0" if version_2 else "1.1", "data": [{"title": "Mixed", "paragraphs": paragraphs}]}


def write_squad(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    two = version == "v2.0"
    for dev, name in ((False, f"train-{version}.json"), (True, f"dev-{version}.json")):
        (folder / name).write_text(json.dumps(squad_json(two, dev), ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def squad_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("squad")
    return {v: write_squad(root / v, v) for v in ("v1.1", "v2.0")}


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    return {
        WORDPIECE: load_tokenizer(TOKENIZER),
        "bytelevel": roberta_style_tokenizer(CONTEXTS),
        "unigram": deberta_style_tokenizer(CONTEXTS),
    }


def _context_tokens(
    tokenizer: PreTrainedTokenizerBase, context: str
) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]


def _first_occurrence(context: str, text: str) -> tuple[int, int]:
    return context.index(text), context.index(text) + len(text)


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
@pytest.mark.parametrize("max_length,doc_stride", [(48, 8), (48, 20), (64, 16), (96, 40)])
@pytest.mark.parametrize("family", [WORDPIECE, "bytelevel", "unigram"])
def test_windows_labels_and_offsets(squad_dirs, tokenizers, version, max_length, doc_stride, family) -> None:
    """For every question of train and dev: its windows are contiguous slices of the whole context's tokens
    that cover all of them, overlapping by doc_stride; a window is labelled with the answer's tokens exactly
    when it holds the answer's characters, else (0, 0); offsets are -1 exactly off the context."""
    tokenizer = tokenizers[family]
    query = 12
    data = SQuADDataModule(
        version, tokenizer, str(squad_dirs[version]), max_length, doc_stride, max_query_length=query
    )
    data.setup("fit")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    for split in ("train", "validation"):
        examples = data.read_split(split)
        rows, window_question, offsets = squad.encode_windows(
            tokenizer, examples, max_length, doc_stride, query
        )
        assert data.datasets[split] == (
            rows if split == "train" else [{**r, "window": w} for w, r in enumerate(rows)]
        )
        assert len(rows) > len(examples), "the contexts are long enough for several windows"
        if split == "validation":
            reference = data.evaluation_set()
            assert reference.window_question.tolist() == window_question
            assert (
                reference.offsets.shape == (len(rows), max_length, 2)
                and reference.offsets.dtype == torch.int32
            )
            assert reference.ids == [e.id for e in examples] and reference.version_2 == (version == "v2.0")
            assert [w["window"] for w in data.datasets[split]] == list(range(len(rows)))
            for w, spans in enumerate(offsets):
                assert reference.offsets[w, : len(spans)].tolist() == [list(s) for s in spans]
                assert (reference.offsets[w, len(spans) :] == -1).all()
        assert window_question == sorted(window_question)
        assert sorted(set(window_question)) == list(range(len(examples)))
        questions = truncated_questions(tokenizer, [e.question for e in examples], query)
        labelled = set()
        for index, example in enumerate(examples):
            windows = [w for w, q in enumerate(window_question) if q == index]
            ids, spans = _context_tokens(tokenizer, example.context)
            question_tokens = len(tokenizer(questions[index], add_special_tokens=False)["input_ids"])
            assert question_tokens <= query and not questions[index][:1].isspace()
            covered = []
            for w in windows:
                row = rows[w]
                inside = [t for t, o in enumerate(offsets[w]) if o != (-1, -1)]
                assert len(offsets[w]) == len(row["input_ids"]) <= max_length
                assert inside == list(range(inside[0], inside[-1] + 1)), "the context is one block"
                assert len(row["input_ids"]) - len(inside) == question_tokens + specials
                first = covered[-1][1] - doc_stride if covered else 0
                piece = slice(first, first + len(inside))
                assert row["input_ids"][inside[0] : inside[-1] + 1] == ids[piece]
                assert [offsets[w][t] for t in inside] == spans[piece]
                covered.append((first, first + len(inside)))
                start, end = row["start_positions"], row["end_positions"]
                if not example.answers:
                    assert (start, end) == (0, 0)
                    continue
                begin, stop = _first_occurrence(example.context, example.answers[0])
                holds = offsets[w][inside[0]][0] <= begin and offsets[w][inside[-1]][1] >= stop
                assert ((start, end) != (0, 0)) == holds
                if holds:
                    assert inside[0] <= start <= end <= inside[-1]
                    text = example.context[offsets[w][start][0] : offsets[w][end][1]]
                    assert normalize_answer(text) == normalize_answer(example.answers[0])
                    if family == "bytelevel":
                        assert text == example.answers[0], "byte-level offsets are trimmed to the word"
                    labelled.add(index)
            assert covered[0][0] == 0 and covered[-1][1] == len(ids), "the windows cover the whole context"
        assert labelled == {i for i, e in enumerate(examples) if e.answers}


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
@pytest.mark.parametrize("family", [WORDPIECE, "bytelevel", "unigram"])
def test_postprocess_round_trip_scores_100(squad_dirs, tokenizers, version, family) -> None:
    """Logits peaked on each answerable question's labelled span (and, for v2.0, on CLS for the unanswerable
    ones) come back through postprocess as the gold answers: exact match and F1 of 100."""
    data = SQuADDataModule(version, tokenizers[family], str(squad_dirs[version]), 64, 16, max_query_length=12)
    data.setup("validate")
    assert list(data.datasets) == ["validation"]
    reference = data.evaluation_set()
    windows = len(data.datasets["validation"])
    start = torch.zeros(windows, data.max_length)
    end = torch.zeros(windows, data.max_length)
    chosen = set()
    for batch in data.val_dataloader():
        for w, s, e in zip(batch["window"], batch["start_positions"], batch["end_positions"], strict=True):
            question = int(reference.window_question[w])
            if not reference.answers[question]:
                start[w, 0] = end[w, 0] = 100.0
            elif (s, e) != (0, 0) and question not in chosen:
                chosen.add(question)
                start[w, s] = end[w, e] = 100.0
    answers = postprocess(
        start,
        end,
        reference.offsets,
        reference.window_question,
        reference.contexts,
        reference.ids,
        version_2=reference.version_2,
    )
    if version == "v1.1":
        assert squad_v1_scores(answers.answers, reference.golds) == {"exact_match": 100.0, "f1": 100.0}
    else:
        scores = squad_v2_scores(answers.answers, reference.golds, answers.null_odds)
        assert scores["exact"] == scores["f1"] == scores["NoAns_exact"] == scores["HasAns_f1"] == 100.0
        assert scores["NoAns_total"] == len(UNANSWERABLE)


def _parquet_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> list[tuple]:
    """Local parquet files standing in for rajpurkar/squad(_v2), from the same questions as the JSON files."""
    import datasets

    files = {}
    for split, dev in (("train", False), ("validation", True)):
        rows: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
        for article in squad_json(version == "v2.0", dev)["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    rows["id"].append(qa["id"])
                    rows["title"].append(article["title"])
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    answers = qa["answers"]
                    rows["answers"].append(
                        {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a["answer_start"] for a in answers],
                        }
                    )
        files[split] = tmp_path / f"{split}.parquet"
        datasets.Dataset.from_dict(rows).to_parquet(str(files[split]))
    asked: list[tuple] = []

    def local_hub(
        name: str, config: str | None = None, split: str | None = None, streaming: bool = False
    ) -> Any:
        asked.append((name, config, split))
        return datasets.load_dataset("parquet", data_files=str(files[split]), split="train")

    monkeypatch.setattr(squad, "load_hub_dataset", local_hub)
    return asked


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
def test_hub_path_reads_the_same_questions_as_the_files(
    tmp_path, monkeypatch, squad_dirs, tokenizers, version
):
    asked = _parquet_hub(tmp_path, monkeypatch, version)
    hub = SQuADDataModule(version, tokenizers[WORDPIECE], None, 64, 16, max_query_length=12)
    files = SQuADDataModule(
        version, tokenizers[WORDPIECE], str(squad_dirs[version]), 64, 16, max_query_length=12
    )
    hub.setup("fit")
    files.setup("fit")
    name = "rajpurkar/squad_v2" if version == "v2.0" else "rajpurkar/squad"
    assert asked == [(name, None, "train"), (name, None, "validation")]
    assert hub.datasets == files.datasets
    assert hub.evaluation_set().golds == files.evaluation_set().golds
    assert any(not answers for answers in hub.evaluation_set().answers) == (version == "v2.0")


def test_hub_version_mismatch_is_an_error(tmp_path, monkeypatch, tokenizers):
    _parquet_hub(tmp_path, monkeypatch, "v2.0")
    with pytest.raises(DataSourceError, match="this is SQuAD v2.0 data: use version v2.0"):
        SQuADDataModule("v1.1", tokenizers[WORDPIECE], None, 64, 16, 12).setup("validate")
    _parquet_hub(tmp_path, monkeypatch, "v1.1")
    with pytest.raises(DataSourceError, match="looks like v1.1 data: use version v1.1"):
        SQuADDataModule("v2.0", tokenizers[WORDPIECE], None, 64, 16, 12).setup("validate")


@pytest.mark.parametrize(
    "alias,name,version",
    [
        ("v1.1", "squad", "v1.1"),
        ("1.1", "squad", "v1.1"),
        ("SQuAD", "squad", "v1.1"),
        ("v2.0", "squad_v2", "v2.0"),
        ("2.0", "squad_v2", "v2.0"),
        ("squad_v2", "squad_v2", "v2.0"),
    ],
)
def test_versions_and_task(alias: str, name: str, version: str) -> None:
    task = get_squad_task(alias)
    assert (task.name, task.version, task.version_2) == (name, version, version == "v2.0")
    assert (task.train_file, task.dev_file) == (f"train-{version}.json", f"dev-{version}.json")
    assert task.hub == ("rajpurkar/squad_v2" if version == "v2.0" else "rajpurkar/squad")
    assert task.num_labels is None
    with pytest.raises(ValueError, match=r"unknown SQuAD version 'v3'.*'v1.1'.*'squad_v2'"):
        SQuADDataModule("v3", TOKENIZER)


def test_collate_pads_each_batch_and_loaders(squad_dirs, tokenizers) -> None:
    """Batches pad to their longest row with the pad id; no token_type_ids where the tokenizer makes none;
    train batches shuffle the same way for the same seed; evaluation batches keep the windows' order."""
    for family in ("bytelevel", "unigram"):
        tokenizer = tokenizers[family]
        data = SQuADDataModule("v2.0", tokenizer, str(squad_dirs["v2.0"]), 96, 32, 12, batch_size=4, seed=3)
        data.setup("fit")
        rows = data.datasets["train"]
        batch = data.collate(rows[:5])
        lengths = [len(r["input_ids"]) for r in rows[:5]]
        assert batch["input_ids"].shape == (5, max(lengths)) and batch["input_ids"].dtype == torch.long
        assert ("token_type_ids" in batch) == (family == "unigram") == ("token_type_ids" in rows[0])
        for i, n in enumerate(lengths):
            assert batch["input_ids"][i, :n].tolist() == rows[i]["input_ids"]
            assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["start_positions"].tolist() == [r["start_positions"] for r in rows[:5]]
        assert "window" not in batch
        again = SQuADDataModule("v2.0", tokenizer, str(squad_dirs["v2.0"]), 96, 32, 12, batch_size=4, seed=3)
        first, second = next(iter(data.train_dataloader())), next(iter(again.train_dataloader()))
        assert torch.equal(first["input_ids"], second["input_ids"])
        windows = torch.cat([b["window"] for b in data.val_dataloader()])
        assert windows.tolist() == list(range(len(data.datasets["validation"])))
        assert torch.equal(next(iter(data.test_dataloader()))["window"], torch.arange(4))
    assert tokenizers["bytelevel"].pad_token_id != 0, "the pad id is the tokenizer's, not 0"


def test_setup_builds_only_what_the_stage_needs(squad_dirs, tokenizers) -> None:
    data = SQuADDataModule("v1.1", tokenizers[WORDPIECE], str(squad_dirs["v1.1"]), 64, 16, 12)
    data.setup("validate")
    assert list(data.datasets) == ["validation"]
    data.setup("predict")
    assert sorted(data.datasets) == ["predict", "validation"]
    # without predict_file, predict answers the dev set
    assert data.evaluation_set("predict").golds == data.evaluation_set("validation").golds
    with pytest.raises(ValueError, match="use 'validation' or 'predict'"):
        data.evaluation_set("train")


def test_predict_file_without_answers(tmp_path, squad_dirs, tokenizers) -> None:
    """A file to answer: the official layout without answers, read with either version."""
    layout = squad_json(False, True)
    for paragraph in layout["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            del qa["answers"]
    (tmp_path / "questions.json").write_text(json.dumps(layout), encoding="utf-8")
    for version in ("v1.1", "v2.0"):
        data = SQuADDataModule(
            version,
            tokenizers[WORDPIECE],
            str(squad_dirs[version]),
            64,
            16,
            12,
            predict_file=str(tmp_path / "questions.json"),
        )
        batches = list(data.predict_dataloader())
        reference = data.evaluation_set("predict")
        assert reference.answers == [[] for _ in ANSWERABLE] and reference.version_2 == (version == "v2.0")
        assert torch.cat([b["window"] for b in batches]).tolist() == list(
            range(len(reference.window_question))
        )
        assert all((b["start_positions"] == 0).all() for b in batches)
        assert list(data.datasets) == ["predict"]


def test_train_answers_with_a_wrong_start_are_moved_or_dropped(tmp_path, tokenizers, caplog) -> None:
    """As in the official train-v1.1.json: a start that misses its text moves to the nearest occurrence; a
    text not in the context drops the question from training; one log line counts both."""
    layout = squad_json(False, False)
    qas = layout["data"][0]["paragraphs"][0]["qas"]
    qas[0]["answers"][0]["answer_start"] = 3  # "The Normans" is at 0
    qas[6]["answers"][0]["answer_start"] = CONTEXTS[0].index("2004")  # nearest "1995" is before it
    qas[1]["answers"][0]["text"] = "Belgium"
    folder = write_squad(tmp_path / "fix", "v1.1")
    (folder / "train-v1.1.json").write_text(json.dumps(layout), encoding="utf-8")
    data = SQuADDataModule("v1.1", tokenizers[WORDPIECE], str(folder), 64, 16, 12)
    with caplog.at_level(logging.INFO, logger="lightning_kd.datamodules.squad_files"):
        examples = data.read_split("train")
    assert [e.id for e in examples] == [f"q{i}" for i in range(len(ANSWERABLE)) if i != 1]
    starts = {e.id: e.starts[0] for e in examples}
    assert starts["q0"] == 0 and starts["q6"] == CONTEXTS[0].index("1995")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "2 training answers" in record.getMessage() and "['q0', 'q6']" in record.getMessage()
    assert "1 questions whose answer text is not in their context" in record.getMessage()
    assert "['q1']" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_kd.datamodules.squad_files"):
        data.read_split("validation")
    assert not caplog.records, "the dev set's answers are scored by text, not moved"


def _write(folder: Path, version: str, layout: Any, which: str = "dev") -> Path:
    write_squad(folder, version)
    text = layout if isinstance(layout, str) else json.dumps(layout)
    (folder / f"{which}-{version}.json").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.pop("data"), r"the top level: no 'data' key"),
        (
            lambda d: d["data"][0].__setitem__("paragraphs", {}),
            r"data\[0\]\.paragraphs: expected a list of paragraphs, found dict",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][1].pop("context"),
            r"data\[0\]\.paragraphs\[1\]: no 'context' key",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("question"),
            r"data\[0\]\.paragraphs\[0\]\.qas\[1\]: no 'question' key",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][2]["answers"][0].__setitem__("answer_start", "7"),
            r"qas\[2\]\.answers\[0\]\.answer_start: expected a character index, found str",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][2].__setitem__("id", "q0"),
            r"two questions have the id 'q0'",
        ),
    ],
)
def test_files_not_in_squad_layout(tmp_path, edit, match) -> None:
    layout = squad_json(False, True)
    edit(layout)
    folder = _write(tmp_path, "v1.1", layout)
    with pytest.raises(DataSourceError, match=match) as error:
        SQuADDataModule("v1.1", TOKENIZER, str(folder), 64, 16, 12).read_split("validation")
    assert "dev-v1.1.json" in str(error.value)


def test_not_json_missing_files_and_folders(tmp_path) -> None:
    folder = _write(tmp_path / "broken", "v1.1", '{"data": [')
    with pytest.raises(DataSourceError, match=r"dev-v1.1.json: not a JSON file .*layout"):
        SQuADDataModule("v1.1", TOKENIZER, str(folder), 64, 16, 12).read_split("validation")
    (folder / "train-v1.1.json").unlink()
    with pytest.raises(
        DataSourceError, match=r"no train-v1.1.json; SQuAD v1.1 reads .*train-v1.1.json and dev-v1.1.json"
    ):
        SQuADDataModule("v1.1", TOKENIZER, str(folder), 64, 16, 12).read_split("train")
    other = write_squad(tmp_path / "two", "v2.0")
    with pytest.raises(
        DataSourceError, match=r"no dev-v1.1.json.*holds train-v2.0.json: pass version='v2.0'"
    ):
        SQuADDataModule("v1.1", TOKENIZER, str(other), 64, 16, 12).setup("validate")
    with pytest.raises(
        DataSourceError, match=r"no such folder.*train-v2.0.json and dev-v2.0.json.*None for the hub"
    ):
        SQuADDataModule("v2.0", TOKENIZER, str(tmp_path / "nowhere"), 64, 16, 12).setup("validate")
    with pytest.raises(DataSourceError, match=r"nothing.json: no such file"):
        SQuADDataModule(
            "v2.0", TOKENIZER, str(other), 64, 16, 12, predict_file=str(tmp_path / "nothing.json")
        ).setup("predict")


def test_the_other_version_is_named(tmp_path) -> None:
    v2 = squad_json(True, True)
    folder = _write(tmp_path / "a", "v1.1", v2)
    with pytest.raises(
        DataSourceError,
        match=r"paragraphs\[0\]\.qas\[7\]: question 'n0' has no answer \(is_impossible: true\): this is SQuAD v2.0 data: use version v2.0",
    ):
        SQuADDataModule("v1.1", TOKENIZER, str(folder), 64, 16, 12).read_split("validation")
    for qa in v2["data"][0]["paragraphs"][0]["qas"]:
        qa.pop("is_impossible")
    folder = _write(tmp_path / "b", "v1.1", v2)
    with pytest.raises(DataSourceError, match=r"question 'n0' has no answer: this is SQuAD v2.0 data"):
        SQuADDataModule("v1.1", TOKENIZER, str(folder), 64, 16, 12).read_split("validation")
    folder = _write(tmp_path / "c", "v2.0", squad_json(False, False), which="train")
    with pytest.raises(
        DataSourceError,
        match=r"train-v2.0.json: no question has an 'is_impossible' key.*looks like v1.1 data: use version v1.1",
    ):
        SQuADDataModule("v2.0", TOKENIZER, str(folder), 64, 16, 12).read_split("train")


def test_window_sizes_that_cannot_work(tokenizers) -> None:
    with pytest.raises(ValueError, match=r"leaves no room for context.*raise max_length above 64"):
        SQuADDataModule("v1.1", TOKENIZER, max_length=64, max_query_length=64, doc_stride=0)
    with pytest.raises(ValueError, match=r"doc_stride=320 is not below the room.*at most 319"):
        SQuADDataModule("v1.1", TOKENIZER, max_length=384, doc_stride=320)
    # with the tokenizer at hand, its special tokens count: 3 for BERT, 4 for RoBERTa's <s> q </s></s> c </s>
    with pytest.raises(ValueError, match=r"doc_stride=317 .*- 3 special tokens = 317\).*at most 316"):
        SQuADDataModule("v1.1", tokenizers[WORDPIECE], max_length=384, doc_stride=317)
    SQuADDataModule("v1.1", tokenizers[WORDPIECE], max_length=384, doc_stride=316)
    by_name = SQuADDataModule("v1.1", TOKENIZER, max_length=384, doc_stride=317)
    with pytest.raises(ValueError, match=r"doc_stride=317 .*at most 316"):
        by_name.setup("validate")
    with pytest.raises(ValueError, match=r"leaves no room.*the 4 special tokens"):
        SQuADDataModule("v1.1", tokenizers["bytelevel"], max_length=68, max_query_length=64, doc_stride=0)
    with pytest.raises(ValueError, match="doc_stride must be an integer of at least 0"):
        SQuADDataModule("v1.1", TOKENIZER, doc_stride=-1)


def test_long_questions_are_cut_to_max_query_length(tokenizers) -> None:
    for tokenizer in tokenizers.values():
        questions = truncated_questions(tokenizer, ["  " + ANSWERABLE[7][1], "Who?"], 9)
        lengths = [len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
        assert lengths[0] == 9 and questions[1] == "Who?"
        assert ANSWERABLE[7][1].startswith(questions[0])
