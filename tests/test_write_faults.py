"""The machine's faults during a write (a full disk, a file-size limit, a read-only or vanished folder): the error
names the cause, the path and the newest complete artifact, and no complete file is replaced by a partial one.

A full disk is made with a file-size limit (``RLIMIT_FSIZE``: the kernel refuses writes past it, with EFBIG,
as a full disk refuses them with ENOSPC), so the writers meet a real refusal; the other causes are raised where
the file system would raise them.
"""

from __future__ import annotations

import errno
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lightning_kd.datamodules.prepare import prepare
from lightning_kd.distillation.teacher_cache import TeacherCache
from lightning_kd.files import WriteFault, atomic_write
from lightning_kd.pruning.export import export_pretrained
from lightning_kd.training.checkpoints import AtomicCheckpointIO
from lightning_kd.training.export import CardFacts, export_model
from tests.datamodules.kd_datafiles import TOKENIZER
from tests.tiny_models import tiny_classifier


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail in this process (EFBIG), as on a disk with that much room left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def checkpoint(size: int) -> dict:
    return {"state_dict": {"w": torch.arange(size, dtype=torch.float32)}, "global_step": size}


def test_a_checkpoint_past_the_space_left_names_the_cause_and_keeps_the_last_one(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(10), tmp_path / "last.ckpt")
    with file_size_limit(50_000), pytest.raises(WriteFault) as raised:
        io.save_checkpoint(checkpoint(100_000), tmp_path / "last.ckpt")
    message = str(raised.value)
    assert raised.value.errno == errno.EFBIG
    assert f"could not write the checkpoint {tmp_path / 'last.ckpt'}" in message
    assert "unchanged: it still holds the previous complete checkpoint" in message
    assert "inline_container" not in message
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial left behind
    # a new name: the message points at the newest complete checkpoint there
    with (
        file_size_limit(50_000),
        pytest.raises(WriteFault, match=r"newest complete checkpoint is .*last\.ckpt"),
    ):
        io.save_checkpoint(checkpoint(100_000), tmp_path / "epoch=1-step=9.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_full_disk_is_named_through_pytorchs_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(obj: object, handle: object) -> None:
        handle.write(b"PK half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # as PyTorch's C++ raises it: the OSError stays its context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteFault, match=r"the disk is full \(ENOSPC\)\. No complete checkpoint was written"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(3), tmp_path / "last.ckpt")
    assert not list(tmp_path.iterdir())


def test_read_only_and_vanished_folders_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "old.pt").write_bytes(b"old")

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "cache" / ".old.pt.1.tmp"))

    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", read_only)
        with pytest.raises(WriteFault, match=r"read-only \(EROFS\).*old\.pt is unchanged"):
            with atomic_write(tmp_path / "cache" / "old.pt", what="teacher cache"):
                pass
    assert (tmp_path / "cache" / "old.pt").read_bytes() == b"old"
    # the folder of a run deleted (or its mount gone) before the write
    gone = tmp_path / "gone"
    with pytest.raises(WriteFault, match=r"the folder vanished while it was written \(ENOENT"):
        with atomic_write(gone / "last.ckpt", what="checkpoint"):
            pass


def test_a_teacher_cache_past_the_space_left_keeps_the_saved_one(tmp_path: Path) -> None:
    cache = TeacherCache(str(tmp_path))
    cache.fingerprint, cache._dirty = "abc", True
    cache.entries = {b"k": {"logits": torch.zeros(2)}}
    cache.save()
    cache.entries, cache._dirty = {bytes([i]): {"logits": torch.zeros(2000)} for i in range(20)}, True
    with (
        file_size_limit(20_000),
        pytest.raises(WriteFault, match="could not write the teacher cache .*unchanged"),
    ):
        cache.save()
    assert len(torch.load(cache.path, weights_only=True)["entries"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher-abc.pt"]


def test_an_export_past_the_space_left_leaves_the_earlier_export_whole(tmp_path: Path) -> None:
    small = tiny_classifier(layers=1, hidden=16, num_labels=2)
    folder = tmp_path / "student"
    export_pretrained(small, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    large = tiny_classifier(layers=4, hidden=64, num_labels=2)
    with file_size_limit(100_000), pytest.raises(WriteFault) as raised:
        export_pretrained(large, folder)
    assert f"could not write the model folder {folder}" in str(raised.value)
    assert "unchanged: it still holds the previous complete model folder" in str(raised.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # the staging folder is gone
    AutoModelForSequenceClassification.from_pretrained(folder)
    # an export that completes replaces the earlier one, shards and all
    export_pretrained(large, folder)
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.hidden_size == 64


def test_an_export_that_fails_and_whose_rescue_fails_says_both(tmp_path: Path) -> None:
    model = tiny_classifier(layers=4, hidden=64, num_labels=2)
    card = CardFacts(teacher="t", method="m")
    with file_size_limit(100_000), pytest.raises(OSError, match=r"nor to .*rescued.*only in memory"):
        export_model(model, tmp_path / "out", card=card, rescue_root=tmp_path)


def test_prepare_on_a_read_only_disk_names_the_folder_and_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} of a small corpus\n" for i in range(5)))

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    output = tmp_path / "prepared"
    with pytest.raises(WriteFault) as raised:
        prepare(output, TOKENIZER, [str(corpus)], max_length=16, num_workers=1)
    assert str(raised.value).startswith(
        f"could not write the prepared folder {output}: the file system is read-only"
    )
    assert "Run the same command again then: the sources that finished are kept." in str(raised.value)
