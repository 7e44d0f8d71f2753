"""Benchmarks of the SLSG inspection stack: the exported model (PyTorch eager vs ONNX Runtime, GFLOP/s
against the machine's matrix-multiply peak), the gateway (end-to-end latency and throughput, decode
cost, memory growth), Triton vs in-process ONNX Runtime, and a locust camera-mix load test.

Every benchmark measures its alternatives in one run with the same thread count, excludes warm-up
iterations, reports the median and 95th percentile, and computes its ratios from those figures.
Modules import only the standard library and numpy at top level; ONNX Runtime, torch, the gateway
and Triton are imported inside the functions that need them (``slsg bench --help`` stays light).
"""

from slsg_bench.report import Table, Timing, emit, environment, percentile_timing

__all__ = ["Table", "Timing", "emit", "environment", "percentile_timing"]
