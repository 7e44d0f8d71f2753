"""This machine's float32 matrix-multiply peak, the yardstick for achieved GFLOP/s.

Two GEMMs of the same square matrices with the same thread count: numpy's BLAS and ONNX
Runtime's MatMul (MLAS). They can differ by 2x: numpy's bundled OpenBLAS picks its kernels by
CPU model and falls back to AVX2 ("Haswell") kernels on CPUs it does not know (e.g. AMD Zen 5),
while MLAS uses AVX-512 where present. The peak is the better of the two.

BLAS reads its thread count from the environment when numpy is first imported, so each
measurement runs in a child interpreter with OMP/OPENBLAS/MKL_NUM_THREADS set to the
benchmark's thread count (``python -m slsg_bench.peak --threads T --backend numpy`` prints JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
BACKENDS = ("numpy", "onnxruntime")


@dataclass(frozen=True)
class MatmulPeak:
    gflops: float  # best of the timed runs: a peak, not a typical figure
    median_gflops: float
    size: int
    threads: int
    iterations: int
    backend: str = "numpy"


def _numpy_matmul(size: int, threads: int):
    import numpy as np

    out = np.empty((size, size), np.float32)
    return lambda a, b: np.matmul(a, b, out=out)


def _ort_matmul(size: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda a, b: session.run(None, {"a": a, "b": b})


def matmul_gflops(size: int = 2048, iterations: int = 10, warmup: int = 1, backend: str = "numpy",
                  threads: int = 1) -> tuple[float, float]:
    """(best, median) GFLOP/s of ``size`` x ``size`` float32 matmuls in this process (2 n^3 FLOP each)."""
    import numpy as np

    if size < 16 or iterations < 1 or backend not in BACKENDS:
        raise ValueError(f"matmul peak needs size >= 16, iterations >= 1 and a backend in {BACKENDS}, "
                         f"got {size}, {iterations}, {backend!r}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    matmul = (_numpy_matmul if backend == "numpy" else _ort_matmul)(size, threads)
    for _ in range(warmup):
        matmul(a, b)
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        matmul(a, b)
        seconds.append(time.perf_counter() - start)
    flop = 2.0 * size ** 3
    return flop / min(seconds) / 1e9, flop / float(np.median(seconds)) / 1e9


def measure_peak(threads: int, size: int = 2048, iterations: int = 10, backend: str = "numpy",
                 timeout_s: float = 300.0) -> MatmulPeak:
    """Run :func:`matmul_gflops` in a child interpreter limited to ``threads`` threads."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    cmd = [sys.executable, "-m", "slsg_bench.peak", "--threads", str(threads), "--size", str(size),
           "--iterations", str(iterations), "--backend", backend]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"matmul peak measurement failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
    return MatmulPeak(**json.loads(done.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True,
                        help="ONNX Runtime threads; numpy's come from the *_NUM_THREADS variables set by the caller")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args(argv)
    best, median = matmul_gflops(args.size, args.iterations, backend=args.backend, threads=args.threads)
    peak = MatmulPeak(round(best, 3), round(median, 3), args.size, args.threads, args.iterations, args.backend)
    print(json.dumps(asdict(peak)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
