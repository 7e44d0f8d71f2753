"""Peak resident memory of a real `slsg serve` under several large heat-map overlays at once.

    python -m slsg_bench.gateway_memory --frame 8000x6000 --concurrency 4 [--budget-mb 512] [--heatmap-max-side 1024]

Serves the toy contract model (tests/onnx_fixtures.py) from a temporary repository, warms up with one
small frame, restarts the kernel's peak counter (/proc/PID/clear_refs), posts the frames at once and
prints the peak growth (VmHWM - VmRSS before), the resident size after, the answer's size and the wall
time. Linux only. Not a test: the test with a limit is tests/test_gateway_process.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from onnx_fixtures import make_card, write_contract_model  # noqa: E402
from slsg.contract import model_path  # noqa: E402


def frame_png(width: int, height: int) -> bytes:
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[height // 4:height // 2, width // 2:3 * width // 4] = (255, 0, 0)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def kib(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", default="8000x6000", help="WxH of each frame")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--budget-mb", type=int, default=512, help="SLSG_DECODE_BUDGET_MB")
    parser.add_argument("--heatmap-max-side", type=int, default=1024, help="SLSG_HEATMAP_MAX_SIDE")
    parser.add_argument("--port", type=int, default=18931)
    args = parser.parse_args()
    width, height = map(int, args.frame.lower().split("x"))
    repo = Path(tempfile.mkdtemp()) / "repo"
    write_contract_model(model_path(repo, "toy", 1), make_card("toy", size=64))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLSG_ORT_THREADS": "1", "SLSG_RECORDS": "off",
           "SLSG_DECODE_BUDGET_MB": str(args.budget_mb), "SLSG_HEATMAP_MAX_SIDE": str(args.heatmap_max_side)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "slsg"), "serve", "--repository", str(repo),
                             "--port", str(args.port), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{args.port}/v1/models/toy/inspect?heatmap=overlay"
    try:
        for _ in range(600):
            try:
                if httpx.post(url, content=frame_png(320, 240), headers={"Content-Type": "image/png"}).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = frame_png(width, height)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before = kib(proc.pid, "VmRSS")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=600) as client:
                return await asyncio.gather(*(client.post(url, content=body, headers={"Content-Type": "image/png"})
                                              for _ in range(args.concurrency)))

        t0 = time.perf_counter()
        answers = asyncio.run(burst())
        wall = time.perf_counter() - t0
        assert all(a.is_success for a in answers), [a.text[:200] for a in answers if not a.is_success]
        print(f"{args.concurrency} x {width}x{height} overlays, budget {args.budget_mb} MB, heat map <= "
              f"{args.heatmap_max_side} px: resident {before / 1024:.0f} MB before, peak +"
              f"{(kib(proc.pid, 'VmHWM') - before) / 1024:.0f} MB, {kib(proc.pid, 'VmRSS') / 1024:.0f} MB after; "
              f"answer {len(answers[0].content) / 1e6:.2f} MB; {wall:.1f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
