"""Timing statistics, the environment block and table/JSON output shared by every benchmark."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of ``n`` timed calls (warm-up excluded), in milliseconds."""

    n: int
    median_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def percentile_timing(seconds: list[float]) -> Timing:
    """Median, p95 (linear interpolation), mean and minimum of durations given in seconds."""
    if not seconds:
        raise ValueError("no timed calls: need at least one measurement")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return Timing(len(ms), float(np.median(ms)), float(np.percentile(ms, 95)), float(ms.mean()), float(ms.min()))


def time_calls(fn: Callable[[], Any], iterations: int, warmup: int = 2) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``iterations`` times timed."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return percentile_timing(seconds)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` to 4 significant digits; None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return float(f"{numerator / denominator:.4g}")  # significant digits: a toy model's ratios are tiny


def environment(threads: int) -> dict[str, Any]:
    """What the figures depend on: cores, load at the start, thread count, library versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_1m": round(load[0], 2),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Table:
    """A titled table of rows; cells are formatted with :func:`format_cell`."""

    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def render(self) -> str:
        cells = [[format_cell(c) for c in row] for row in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(self.headers)]
        line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                        for i, (v, w) in enumerate(zip(values, widths)))
        out = [self.title, line(self.headers), line(["-" * w for w in widths])]
        out += [line(r) for r in cells]
        return "\n".join(out)


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def emit(report: dict[str, Any], tables: list[Table], as_json: bool) -> None:
    """Tables to stdout; with ``as_json`` the JSON document alone goes to stdout, tables to stderr."""
    text = "\n\n".join(t.render() for t in tables)
    if as_json:
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(text)
        env = report.get("environment", {})
        print(f"\n{env.get('cpu_count')} CPU cores, {env.get('threads')} threads, "
              f"load average {env.get('load_average_1m')} at start")
