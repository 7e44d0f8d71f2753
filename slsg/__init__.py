"""SLSG inspection: the shared core (CLI entry point and the model-repository contract).

This package imports nothing heavier than numpy, so both the training side
(`slsg_train`, torch) and the gateway (`slsg_gateway`, no torch) can depend on it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slsg-inspection")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
