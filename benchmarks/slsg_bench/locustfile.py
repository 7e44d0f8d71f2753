"""Camera-mix load test of the inspection gateway (locust).

Each locust user is one camera: cameras are spread over several production lines
(``X-Line-Id``) with several cameras each (``X-Camera-Id``), and each camera sends a LOCO-size
JPEG (about 1600x1280, a synthetic tray scene generated once per run) at its own rate of
1-3 frames/s (``constant_pacing``: the pace holds whatever the response time, as a camera's
trigger does; a camera that falls behind sends its next frame at once).

Run headless, bounded, against a gateway on this machine::

    SLSG_LOAD_MODEL=tray locust -f benchmarks/slsg_bench/locustfile.py --headless --users 8 --spawn-rate 8 \
        --run-time 20s --host http://127.0.0.1:8080 --csv /tmp/load --only-summary

or let ``slsg bench load`` start a gateway and do the above. Settings (environment):
SLSG_LOAD_MODEL (tray), SLSG_LOAD_LINES (3), SLSG_LOAD_CAMERAS_PER_LINE (4), SLSG_LOAD_FPS (1-3),
SLSG_LOAD_FRAME_SIZE (1600x1280), SLSG_LOAD_FRAMES (4 distinct frames), SLSG_API_KEY (sent as
X-API-Key when set), SLSG_LOAD_ALLOW_REMOTE=1 to target a host other than loopback.
"""

from __future__ import annotations

import itertools
import os
import random
from urllib.parse import urlparse

from locust import constant_pacing, events, task
from locust.contrib.fasthttp import FastHttpUser

from slsg_bench.frames import camera_jpeg, parse_size

MODEL = os.environ.get("SLSG_LOAD_MODEL", "tray")
LINES = int(os.environ.get("SLSG_LOAD_LINES", "3"))
CAMERAS_PER_LINE = int(os.environ.get("SLSG_LOAD_CAMERAS_PER_LINE", "4"))
FPS_MIN, FPS_MAX = (float(v) for v in os.environ.get("SLSG_LOAD_FPS", "1-3").split("-"))
FRAME_SIZE = parse_size(os.environ.get("SLSG_LOAD_FRAME_SIZE", "1600x1280"))
DISTINCT_FRAMES = int(os.environ.get("SLSG_LOAD_FRAMES", "4"))
API_KEY = os.environ.get("SLSG_API_KEY", "")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

FRAMES: list[bytes] = []  # filled once at start-up, before any user runs
_camera_numbers = itertools.count()


@events.init.add_listener
def prepare(environment, **_kwargs) -> None:
    """Refuse non-loopback targets (unless allowed) and encode the frames before the clock starts."""
    host = urlparse(environment.host or "").hostname
    if host not in LOOPBACK and os.environ.get("SLSG_LOAD_ALLOW_REMOTE") != "1":
        raise SystemExit(f"locustfile: host {environment.host!r} is not loopback; set SLSG_LOAD_ALLOW_REMOTE=1 "
                         "to load another machine")
    if not FRAMES:
        FRAMES.extend(camera_jpeg(*FRAME_SIZE, seed=i) for i in range(DISTINCT_FRAMES))


class Camera(FastHttpUser):
    """One camera on one line, sending frames at a fixed rate between FPS_MIN and FPS_MAX."""

    network_timeout = 60.0

    def on_start(self) -> None:
        number = next(_camera_numbers)
        self.line_id = f"line-{number % LINES + 1}"
        self.camera_id = f"{self.line_id}-cam-{number // LINES % CAMERAS_PER_LINE + 1}"
        self.frames_per_s = random.uniform(FPS_MIN, FPS_MAX)
        self._pace = constant_pacing(1.0 / self.frames_per_s)
        self.frame = FRAMES[number % len(FRAMES)]
        self.headers = {"Content-Type": "image/jpeg", "X-Line-Id": self.line_id, "X-Camera-Id": self.camera_id}
        if API_KEY:
            self.headers["X-API-Key"] = API_KEY

    def wait_time(self) -> float:
        return self._pace(self)

    @task
    def inspect_frame(self) -> None:
        with self.client.post(f"/v1/models/{MODEL}/inspect", data=self.frame, headers=self.headers,
                              name="/v1/models/[model]/inspect", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
            elif "score" not in (response.json() or {}):
                response.failure("200 without a score in the body")
            else:
                response.success()
