"""Tests of the training side (torch): skipped as a whole where torch is not installed, as in a
serve-only environment."""

import pytest

pytest.importorskip("torch", reason="the training side needs torch (pip install -e '.[train]')")
