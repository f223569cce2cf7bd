"""Files the data tests write: a text corpus with numbered documents, GLUE folders in their TSV layouts."""

from __future__ import annotations

from pathlib import Path

TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly box jovial zebras near "
    "rivers mountains and unbelievable tokenization of extraordinary documents"
).split()


def document(index: int, words: int = 12) -> str:
    """A document with a unique number, of varied length, so packing crosses document boundaries."""
    body = " ".join(WORDS[(index * 7 + k) % len(WORDS)] for k in range(words + index % 17))
    return f"document {index} {body}"


def write_lines(path: Path, count: int, first: int = 0) -> list[str]:
    lines = [document(i) for i in range(first, first + count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


SENTENCES = [
    'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
    'Referring to him as only " the witness , Amrozi accused his brother of deliberately distorting it .',
    "They had published an advertisement on the Internet on June 10 , offering the cargo for sale .",
    "The stock rose $ 2.11 , or about 11 percent , to close Friday at $ 21.51 on the New York Stock Exchange .",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "Our friends won't buy this analysis, let alone the next one we propose.",
    "How do I read and find my YouTube comments ?",
]


def sentence(i: int) -> str:
    return f"{SENTENCES[i % len(SENTENCES)]} ({i})"


def glue_rows(task: str, count: int, dev: bool = False) -> list[str]:
    """Rows in the layout of GLUE's download script, with a header where the real files have one."""
    rows: list[str] = []
    for i in range(count):
        s1, s2, y = sentence(i), sentence(i + 3), i % 2
        if task == "CoLA":
            rows.append(f"gj04\t{y}\t{'' if y else '*'}\t{s1}")
        elif task == "SST-2":
            rows.append(f"{s1}\t{y}")
        elif task == "MRPC":
            rows.append(f"{y}\t{1000 + i}\t{2000 + i}\t{s1}\t{s2}")
        elif task == "QQP":
            rows.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{s1}\t{s2}\t{y}")
        elif task == "STS-B":
            rows.append(
                f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s1}\t{s2}\t{(i % 11) / 2:.3f}"
            )
        elif task == "MNLI":
            gold = ("entailment", "neutral", "contradiction")[i % 3]
            labels = "\t".join([gold] * (5 if dev else 1))
            rows.append(
                f"{i}\t{31193 + i}\t{31193 + i}n\tgovernment\t( ( x ) )\t( ( y ) )\t(ROOT (S x))\t(ROOT (S y))\t{s1}\t{s2}\t{labels}\t{gold}"
            )
        elif task in ("QNLI", "RTE"):
            rows.append(f"{i}\t{s1}\t{s2}\t{'not_entailment' if y else 'entailment'}")
        elif task == "WNLI":
            rows.append(f"{i}\t{s1}\t{s2}\t{y}")
    return rows


GLUE_HEADERS = {
    "SST-2": "sentence\tlabel",
    "MRPC": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "QQP": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "QNLI": "index\tquestion\tsentence\tlabel",
    "RTE": "index\tsentence1\tsentence2\tlabel",
    "WNLI": "index\tsentence1\tsentence2\tlabel",
}
MNLI_COLUMNS = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"


def write_glue_task(root: Path, task: str, train: int = 40, dev: int = 24) -> Path:
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    files = (
        {"train.tsv": False, "dev.tsv": True}
        if task != "MNLI"
        else {"train.tsv": False, "dev_matched.tsv": True, "dev_mismatched.tsv": True}
    )
    for name, dev_file in files.items():
        if task == "MNLI":
            header = (
                MNLI_COLUMNS
                + ("\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5" if dev_file else "\tlabel1")
                + "\tgold_label"
            )
        else:
            header = GLUE_HEADERS.get(task)
        rows = glue_rows(task, dev if dev_file else train, dev_file)
        (folder / name).write_text("\n".join(([header] if header else []) + rows) + "\n", encoding="utf-8")
    return folder


GLUE_FOLDERS = ["CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI"]


# GLUE's unlabeled test files: a header with `index` (QQP: `id`) and the text columns, no labels.
GLUE_TEST_HEADERS = {
    "CoLA": "index\tsentence",
    "SST-2": "index\tsentence",
    "MRPC": "index\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "QQP": "id\tquestion1\tquestion2",
    "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
    "MNLI": MNLI_COLUMNS,
    "QNLI": "index\tquestion\tsentence",
    "RTE": "index\tsentence1\tsentence2",
    "WNLI": "index\tsentence1\tsentence2",
}
GLUE_TEST_FILES = {"MNLI": ["test_matched.tsv", "test_mismatched.tsv"]}


def submission_index(i: int) -> int:
    """The ``index`` column of row ``i`` of a test file: not from 0 and not consecutive, so a submission that
    wrote row positions instead of the file's indices would not pass."""
    return 1000 + 3 * i


def glue_test_row(task: str, i: int) -> str:
    s1, s2, n = sentence(i + 1), sentence(i + 5), submission_index(i)
    if task in ("CoLA", "SST-2"):
        return f"{n}\t{s1}"
    if task == "MRPC":
        return f"{n}\t{3000 + i}\t{4000 + i}\t{s1}\t{s2}"
    if task == "QQP":
        return f"{n}\t{s1}\t{s2}"
    if task == "STS-B":
        return f"{n}\tmain-forums\tdeft-forum\t2014\t{i:04d}\tnone\tnone\t{s1}\t{s2}"
    if task == "MNLI":
        return f"{n}\t{41193 + i}\t{41193 + i}e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{s1}\t{s2}"
    return f"{n}\t{s1}\t{s2}"


def write_glue_test_files(root: Path, task: str, count: int = 10) -> list[Path]:
    """The task's test file(s) in its folder under ``root``; with MNLI also the AX diagnostic set."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in GLUE_TEST_FILES.get(task, ["test.tsv"]):
        rows = [glue_test_row(task, i) for i in range(count)]
        (folder / name).write_text("\n".join([GLUE_TEST_HEADERS[task], *rows]) + "\n", encoding="utf-8")
        written.append(folder / name)
    if task == "MNLI":
        (root / "diagnostic").mkdir(exist_ok=True)
        rows = [f"{submission_index(i)}\t{sentence(i)}\t{sentence(i + 2)}" for i in range(count + 3)]
        (root / "diagnostic" / "diagnostic.tsv").write_text(
            "\n".join(["index\tsentence1\tsentence2", *rows]) + "\n"
        )
        written.append(root / "diagnostic" / "diagnostic.tsv")
    return written
