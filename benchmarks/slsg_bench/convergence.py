"""How long gateways take to converge on a `slsg deploy`, under camera traffic.

Starts ``--gateways`` real ``slsg serve`` processes (embedded ONNX Runtime) on a copy of one model
version, published as versions 1 and 2, sends frames to all of them from ``--cameras`` clients each, and
deploys 2, 1, 2, ... ``--deploys`` times. For each deploy it reports the seconds from ``slsg deploy``
returning until every gateway's ``/v1/models`` serves the version (the slowest gateway), and at the end the
failed requests and the requests sent after convergence that another version answered.

    .venv/bin/python -m slsg_bench.convergence --repository data/repo --name tray --interval 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from slsg.contract import CONFIG_FILENAME, list_versions, model_path
from slsg_bench.gateway import wait_ready

SLSG = str(Path(sys.executable).parent / "slsg")


def frame_png(size: int = 256) -> bytes:
    pixels = np.full((size, size, 3), 128, np.uint8)
    pixels[size // 4: size // 2, size // 4: size // 2] = (255, 0, 0)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def two_versions(source: Path, name: str, into: Path) -> None:
    """``into/name`` with the newest version of ``source/name`` as versions 1 and 2."""
    newest = list_versions(source, name)[-1]
    (into / name).mkdir(parents=True)
    shutil.copy(source / name / CONFIG_FILENAME, into / name / CONFIG_FILENAME)
    for version in (1, 2):
        model_path(into, name, version).parent.mkdir()
        shutil.copy(model_path(source, name, newest), model_path(into, name, version))


def start_gateways(root: Path, count: int, interval_s: float, threads: int, base_port: int) -> list[subprocess.Popen]:
    env = {**os.environ, "SLSG_RECONCILE_INTERVAL_S": str(interval_s), "SLSG_ORT_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    return [subprocess.Popen([SLSG, "serve", "--backend", "embedded", "--repository", str(root), "--port",
                              str(base_port + i), "--log-level", "warning"], env=env) for i in range(count)]


async def served(client: httpx.AsyncClient, url: str, name: str) -> int | None:
    models = (await client.get(f"{url}/v1/models")).json()["models"]
    return next((m["served_version"] for m in models if m["name"] == name), None)


async def measure(args: argparse.Namespace, root: Path, urls: list[str]) -> dict:
    frame = frame_png()
    statuses: list[int] = []
    stale: list[int] = []  # versions that answered a request sent after convergence, other than the desired
    desired: list[int | None] = [None]
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=60) as client:
        async def camera(url: str) -> None:
            while not stop.is_set():
                expected = desired[0]
                r = await client.post(f"{url}/v1/models/{args.name}/inspect", content=frame,
                                      headers={"Content-Type": "image/png"})
                statuses.append(r.status_code)
                if r.status_code == 200 and expected is not None and r.json()["version"] != expected:
                    stale.append(r.json()["version"])

        cameras = [asyncio.create_task(camera(url)) for url in urls for _ in range(args.cameras)]
        times = []
        for step in range(args.deploys):
            version = 1 if step % 2 == 0 else 2  # the gateways start on the newest, 2
            desired[0] = None
            deploy = await asyncio.create_subprocess_exec(SLSG, "deploy", args.name, "--version", str(version),
                                                          "--repository", str(root), stdout=subprocess.DEVNULL)
            assert await deploy.wait() == 0
            start = time.monotonic()
            while [await served(client, url, args.name) for url in urls] != [version] * len(urls):
                await asyncio.sleep(0.05)
            times.append(time.monotonic() - start)
            desired[0] = version
            print(f"deploy {step + 1}: version {version} on all {len(urls)} gateways after {times[-1]:.2f} s",
                  flush=True)
            await asyncio.sleep(args.settle_s)
        stop.set()
        await asyncio.gather(*cameras)
    return {"interval_s": args.interval, "gateways": len(urls), "deploys": len(times),
            "converge_s": {"median": statistics.median(times), "max": max(times), "min": min(times)},
            "requests": len(statuses), "failed": sum(s != 200 for s in statuses),
            "other_version_after_convergence": len(stale)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True, help="repository holding the model to copy")
    parser.add_argument("--name", required=True)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--cameras", type=int, default=2, help="clients per gateway, each posting back to back")
    parser.add_argument("--interval", type=float, default=5.0, help="SLSG_RECONCILE_INTERVAL_S")
    parser.add_argument("--deploys", type=int, default=6)
    parser.add_argument("--settle-s", type=float, default=1.0, help="traffic after each convergence")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per gateway")
    parser.add_argument("--base-port", type=int, default=18780)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        two_versions(args.repository, args.name, root)
        processes = start_gateways(root, args.gateways, args.interval, args.threads, args.base_port)
        urls = [f"http://127.0.0.1:{args.base_port + i}" for i in range(args.gateways)]
        try:
            deadline = time.monotonic() + 120
            for url, process in zip(urls, processes):
                try:
                    wait_ready(url, deadline, process)
                except RuntimeError as exc:
                    raise SystemExit(str(exc)) from exc
            report = asyncio.run(measure(args, root, urls))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
    print(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
