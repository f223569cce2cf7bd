"""Files as tools write them: a byte-order mark (Notepad, PowerShell, Excel's "CSV UTF-8"), UTF-16 (Excel's
"Unicode Text") and CRLF line ends are read, not refused; a corpus folder that also holds metadata is read by its
data files' extensions, or refused naming a glob that works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kd_datafiles import GLUE_HEADERS, glue_rows
from test_squad_data import squad_json

from lightning_kd.datamodules.glue import read_test_tsv, read_tsv
from lightning_kd.datamodules.glue_tasks import get_task
from lightning_kd.datamodules.sources import DataSourceError, parse_source, read_documents
from lightning_kd.datamodules.squad_files import read_squad_json

BOM = "\ufeff"


def spreadsheet(path: Path, lines: list[str], encoding: str = "utf-8", bom: bool = True) -> Path:
    """Lines as Windows tools save them: CRLF, and a byte-order mark (Python's UTF-16 codec writes its own)."""
    mark = BOM if bom and encoding == "utf-8" else ""
    path.write_bytes((mark + "\r\n".join(lines) + "\r\n").encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_a_glue_tsv_with_a_byte_order_mark_and_crlf_reads_as_the_plain_file(
    tmp_path: Path, encoding: str
) -> None:
    task = get_task("mrpc")
    lines = [GLUE_HEADERS["MRPC"], *glue_rows("MRPC", 6)]
    plain = tmp_path / "plain.tsv"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    saved = spreadsheet(tmp_path / "excel.tsv", lines, encoding)
    assert read_tsv(saved, task) == read_tsv(plain, task)
    assert all(not text.endswith("\r") for texts, _ in read_tsv(saved, task) for text in texts)


def test_a_glue_test_file_with_a_byte_order_mark_finds_its_index_column(tmp_path: Path) -> None:
    saved = spreadsheet(tmp_path / "test.tsv", ["index\tsentence", "0\tgood fun", "1\tdull"])
    assert [index for _, index in read_test_tsv(saved, ("sentence",))] == [0, 1]


def test_a_file_in_another_encoding_names_the_conversion(tmp_path: Path) -> None:
    latin = tmp_path / "dev.tsv"
    latin.write_bytes(f"{GLUE_HEADERS['SST-2']}\ncaf\xe9 society\t1\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"not UTF-8 or UTF-16 text .* save it as UTF-8, e\.g\. `iconv"):
        read_tsv(latin, get_task("sst2"))


def test_a_squad_file_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    plain, saved = tmp_path / "dev.json", tmp_path / "dev-windows.json"
    plain.write_text(json.dumps(squad_json(False, True)), encoding="utf-8")
    pretty = json.dumps(squad_json(False, True), indent=2).split("\n")  # the CRLFs fall between JSON tokens
    spreadsheet(saved, pretty)
    assert read_squad_json(saved, version_2=False) == read_squad_json(plain, version_2=False)


def documents(source: str | dict) -> list[str]:
    return list(read_documents(parse_source(source), 0, 1))


def test_jsonl_and_text_corpora_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    spreadsheet(tmp_path / "a.jsonl", [json.dumps({"text": "first doc"}), json.dumps({"text": "second doc"})])
    assert documents(str(tmp_path / "a.jsonl")) == ["first doc", "second doc"]
    spreadsheet(tmp_path / "b.txt", ["one line", "two line"], "utf-16")
    assert documents(str(tmp_path / "b.txt")) == ["one line", "two line"]


def test_a_json_file_holding_an_array_of_records_is_read(tmp_path: Path) -> None:
    (tmp_path / "records.json").write_text(
        json.dumps([{"text": "a"}, {"text": " "}, {"text": "b"}], indent=2)
    )
    assert documents(str(tmp_path / "records.json")) == ["a", "b"]
    (tmp_path / "bad.json").write_text(json.dumps([{"body": "a"}]))
    with pytest.raises(DataSourceError, match=r"bad\.json, record 0: no string field 'text'; set text_field"):
        documents(str(tmp_path / "bad.json"))


def test_a_corpus_folder_is_read_by_its_data_files_and_metadata_is_left_out(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-0.jsonl").write_text(json.dumps({"text": "kept"}) + "\n")
    (corpus / "dataset_info.json").write_text(json.dumps({"features": {"text": "string"}}, indent=2))
    (corpus / "stats.json").write_text(json.dumps({"documents": 1}))
    (corpus / "README.txt").write_text("how this corpus was made\n")
    (corpus / "README.md").write_text("# corpus\n")
    assert documents(str(corpus)) == ["kept"]


def test_a_folder_of_json_data_and_json_metadata_is_refused_naming_a_glob_that_works(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):
        (corpus / f"part-{part}.json").write_text(json.dumps({"text": f"doc {part}"}) + "\n")
    (corpus / "meta.json").write_text(json.dumps({"name": "corpus", "size": 2}, indent=2))
    with pytest.raises(DataSourceError) as refused:
        documents(str(corpus))
    glob = f"{corpus}/part-*.json"
    assert "meta.json, line 1: not valid JSON lines" in str(refused.value)
    assert f"name the data files with a glob such as {glob!r}" in str(refused.value)
    assert documents(glob) == ["doc 0", "doc 1"]  # the glob it names works
