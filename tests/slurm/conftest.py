"""The SLURM cluster and the tiny job assets, shared by every test of this folder.

Where the cluster cannot start (not root, SLURM missing and not installable) the tests skip with the reason,
unless ``LKD_REQUIRE_SLURM=1`` is set, as ``.ci/run`` does: then that reason fails them, so CI cannot lose the
library's only proof of its SLURM claims to a skip nobody reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, cannot_run, install_slurm, missing_tools
from slurm_jobs import write_assets


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two SLURM nodes on this machine; SLURM is installed first when it is missing and we are root."""
    missing = missing_tools()
    if os.geteuid() != 0:
        cannot_run(
            f"the test cluster needs root (network namespaces, slurmd starting jobs"
            f"{', and apt-get install of ' + ', '.join(missing) if missing else ''}): run pytest as root"
        )
    if missing:
        try:
            install_slurm()
        except RuntimeError as error:
            cannot_run(f"SLURM tools missing ({', '.join(missing)}) and installing them failed: {error}")
        if still := missing_tools():
            cannot_run(f"apt-get installed SLURM, but {', '.join(still)} are still not on PATH")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def job_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_assets(tmp_path_factory.mktemp("slurm_assets"))
