"""CI cannot lose the SLURM tests to a skip: under LKD_REQUIRE_SLURM=1 (set by .ci/run) the reason fails them."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_cluster import cannot_run

CI_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "run"


def test_a_missing_cluster_skips_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LKD_REQUIRE_SLURM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        cannot_run("the test cluster needs root")


def test_a_missing_cluster_fails_where_slurm_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LKD_REQUIRE_SLURM", "1")
    with pytest.raises(
        pytest.fail.Exception, match="LKD_REQUIRE_SLURM=1 .* cannot run: the test cluster needs root"
    ):
        cannot_run("the test cluster needs root")


def test_ci_requires_the_slurm_tests() -> None:
    assert "export LKD_REQUIRE_SLURM=1" in CI_SCRIPT.read_text()
