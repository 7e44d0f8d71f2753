"""Helpers for tests of every folder: the real ``slsg`` console script, and free loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

SLSG_BIN = str(Path(sys.executable).parent / "slsg")  # the real console script of this environment


def run_slsg(*args: str | Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``slsg ARGS`` as a user would (one thread per process: tests share two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([SLSG_BIN, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"slsg {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 (sockets held together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def png_bytes(pixels, image_format: str = "PNG", **save_options) -> bytes:
    """A uint8 array as the bytes of an image file (PNG unless told), as a camera client would send it."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=image_format, **save_options)
    return out.getvalue()


def local_triton(repository: Path, models: list[str]):
    """A real, not yet started ``LocalTriton`` on free ports serving ``models`` of ``repository`` in explicit
    control mode; skips the calling test where no ``tritonserver`` is installed."""
    import pytest

    triton_local = pytest.importorskip("slsg_triton.local")
    try:
        triton_local.find_tritonserver()
    except triton_local.TritonNotFoundError as exc:
        pytest.skip(str(exc))
    http, grpc, metrics = free_ports(3)
    return triton_local.LocalTriton(repository, http, grpc, metrics, model_control_mode="explicit", load_models=models)
