"""Shared test fixtures: free loopback ports and a model repository holding the toy contract model.

Helpers that test modules import (``run_slsg``, ``free_ports``) live in ``support.py``; ``tests/`` is
on ``sys.path`` (pyproject's ``pythonpath``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from onnx_fixtures import make_card, write_contract_model
from support import free_ports
from slsg.contract import ModelCard, model_path
from slsg.triton_config import write_config

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
