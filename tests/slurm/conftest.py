"""The SLURM cluster and the tiny job assets, shared by every test of this folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, install_slurm, missing_tools
from slurm_jobs import write_assets


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two SLURM nodes on this machine; SLURM is installed first when it is missing and we are root."""
    missing = missing_tools()
    if missing and os.geteuid() != 0:
        pytest.skip(f"SLURM tools missing ({', '.join(missing)}) and only root may apt-get install them")
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root: network namespaces, and slurmd starting jobs")
    if missing:
        install_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def job_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_assets(tmp_path_factory.mktemp("slurm_assets"))
