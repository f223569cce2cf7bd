"""The streaming path reads every document exactly once per pass, for any ranks x dataloader workers.

Ranks are simulated by building the dataset with a rank and world size; workers are real DataLoader workers.
The hub path goes through the real ``datasets`` streaming code on a local folder of parquet files, as a hub
copy of Wikipedia would (many files, fewer or more than the readers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_data import documents_by_reader, normalised
from kd_datafiles import TOKENIZER, document
from torch.utils.data import DataLoader

from lightning_kd.datamodules import PretrainingDataModule
from lightning_kd.datamodules.masking import unpack

DOCUMENTS = 90


def write_corpus(folder: Path, files: int, kind: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    texts = [document(i) for i in range(DOCUMENTS)]
    # Uneven files, so no reader can get the same amount by luck.
    bounds = [round(DOCUMENTS * (k / files) ** 1.3) for k in range(files + 1)]
    for k in range(files):
        part = texts[bounds[k] : bounds[k + 1]]
        if kind == "hub":
            pq.write_table(
                pa.table({"text": part, "id": list(range(len(part)))}), folder / f"train-{k:05d}.parquet"
            )
        else:
            (folder / f"part-{k:02d}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
    return texts


def read_all(source: object, ranks: int, workers: int, tokenizer) -> list[str]:
    seen: dict[int, list[str]] = {}
    for rank in range(ranks):
        dm = PretrainingDataModule(
            TOKENIZER, [source], max_length=32, batch_size=4, repeat=False, num_workers=workers
        )
        dm.train_dataloader()
        dataset = dm._dataset
        dataset.rank, dataset.world_size = rank, ranks
        batches = [unpack(b) for b in DataLoader(dataset, batch_size=None, num_workers=workers)]
        by_reader = documents_by_reader(batches, tokenizer)
        assert not set(by_reader) & set(seen), "two ranks used the same reader index"
        seen.update(by_reader)
    return [doc for docs in seen.values() for doc in docs]


@pytest.mark.parametrize("kind", ["local", "hub"])
@pytest.mark.parametrize("files", [4, 5])
def test_every_document_once_for_any_ranks_and_workers(tmp_path, tokenizer, kind, files):
    texts = write_corpus(tmp_path / "corpus", files, kind)
    expected = sorted(normalised(texts, tokenizer))
    source = {"hub": str(tmp_path / "corpus")} if kind == "hub" else str(tmp_path / "corpus")
    failures = []
    for ranks in (1, 2):
        for workers in (0, 1, 2, 4):
            docs = read_all(source, ranks, workers, tokenizer)
            if sorted(docs) != expected:
                failures.append(
                    f"{ranks} ranks x {workers} workers: {len(set(docs))} distinct of {len(expected)}, "
                    f"{len(docs) - len(set(docs))} repeats"
                )
    assert not failures, failures
