"""Shared test fixtures: free loopback ports and a model repository holding the toy contract model.

Helpers that test modules import (``run_slsg``, ``free_ports``) live in ``support.py``; ``tests/`` is
on ``sys.path`` (pyproject's ``pythonpath``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from onnx_fixtures import make_card, write_contract_model
from support import free_ports
from slsg.contract import ModelCard, model_path
from slsg.triton_config import write_config

# gateways started by tests keep inspection records (on by default) in a temporary folder, not the checkout
os.environ.setdefault("SLSG_DATA_DIR", tempfile.mkdtemp(prefix="slsg-test-data-"))

TOY_MODEL = "toy"


@pytest.fixture
def free_port() -> int:
    return free_ports(1)[0]


@dataclass(frozen=True)
class ContractRepository:
    """A production model repository: ``<root>/<name>/config.pbtxt`` and ``<root>/<name>/1/model.onnx``."""

    root: Path
    name: str
    card: ModelCard

    def model_file(self, version: int = 1) -> Path:
        return model_path(self.root, self.name, version)


@pytest.fixture(scope="session")
def contract_repository(tmp_path_factory: pytest.TempPathFactory) -> ContractRepository:
    """The toy contract model (64x64, top-K 16) as version 1 with its production config.pbtxt.

    Shared by the whole session: treat it as read-only; copy it (``shutil.copytree``) to add versions.
    """
    root = tmp_path_factory.mktemp("contract_repository")
    card = make_card(TOY_MODEL)
    write_contract_model(model_path(root, TOY_MODEL, 1), card)
    write_config(root, TOY_MODEL, card)
    return ContractRepository(root=root, name=TOY_MODEL, card=card)



@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> str:
    """The URL of a real PostgreSQL server (Debian's package) for this session; skips where none is installed."""
    from pg_fixtures import postgres_bindir, start_postgres

    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server not installed (Debian package 'postgresql'; `make test` installs it)")
    pytest.importorskip("psycopg", reason="psycopg not installed (`pip install -e .[dev]` brings it)")
    # not under pytest's tmp folder: that is private to root, and the server may run as 'postgres'
    root = Path(tempfile.mkdtemp(prefix="slsg-postgres-"))
    server = start_postgres(root)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.rsplit("/", 1)[0] + "/" + name
