"""Tests of the gateway. They must pass in a serve-only environment (``.[serve,dev]``, no torch):
nothing here or in these tests may import torch or the training side (tests/core/test_layers.py
checks the gateway's own imports)."""
