"""One answer to "can the hub be reached?", shared by model loading and hub datasets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lightning_kd import hub
from lightning_kd.datamodules import sources
from lightning_kd.datamodules.sources import DataSourceError, load_hub_dataset

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No offline switches and no proxy, with a fresh probe before and after."""
    import datasets
    import huggingface_hub.constants as hub_constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *hub.PROXY_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    # the hub clients read the switches once, at import (CI sets them for the whole run)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


class Loader:
    """Stands in for ``AutoModel``: records what ``from_pretrained`` was asked."""

    seen: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, source: str, **kwargs: Any) -> str:
        cls.seen = dict(kwargs)
        return source


def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``datasets.load_dataset`` that downloads nothing; returns the hub client's offline flag per call."""
    import datasets
    import huggingface_hub.constants as hub_constants

    calls: list[bool] = []

    def load_dataset(name: str, *args: Any, **kwargs: Any) -> str:
        calls.append(bool(hub_constants.HF_HUB_OFFLINE))
        if hub_constants.HF_HUB_OFFLINE:
            raise ConnectionError(f"{name} is not in the cache")
        return name

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("proxy", hub.PROXY_SETTINGS)
def test_behind_a_proxy_the_hub_counts_as_reachable_for_models_and_datasets(
    online: None, monkeypatch: pytest.MonkeyPatch, proxy: str
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)  # a direct probe would fail: the proxy decides
    monkeypatch.setenv(proxy, "http://proxy.example:3128")
    reach = hub.hub_reachable()
    assert reach and reach.reason is None
    assert hub.load_model("org/model", Loader) == "org/model"
    assert "local_files_only" not in Loader.seen
    assert sources.hub_unreachable_reason() is None
    calls = fake_datasets(monkeypatch)
    assert load_hub_dataset("org/corpus") == "org/corpus"
    assert calls == [False]  # asked the hub, not only the cache


def test_without_a_proxy_an_unreachable_endpoint_is_unreachable_for_both(
    online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    reach = hub.hub_reachable()
    assert not reach
    assert reach.reason is not None and "127.0.0.1:9" in reach.reason
    assert hub.load_model("org/model", Loader) == "org/model"
    assert Loader.seen == {"local_files_only": True}  # from the cache only, no retries
    assert sources.hub_unreachable_reason() == reach.reason
    calls = fake_datasets(monkeypatch)
    with pytest.raises(
        DataSourceError, match=r"'org/corpus' cannot be reached \(no connection to 127\.0\.0\.1:9"
    ):
        load_hub_dataset("org/corpus")
    assert calls == [True]  # the local cache was tried, offline


def test_the_answer_is_kept_until_the_cache_is_cleared(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    assert not hub.hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert not hub.hub_reachable()  # the process's answer, until asked again
    hub.hub_reachable.cache_clear()
    assert hub.hub_reachable()


def test_the_offline_switches_stop_hub_datasets_before_any_probe(
    online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert sources.hub_unreachable_reason() == "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set"
