"""The README's picture: a frame, the gateway's heat map of it and its JSON answer, side by side.

    python scripts/inspection_figure.py --url http://127.0.0.1:8080 --model tray IMAGE docs/figures/inspection.png

It asks a running gateway, so the picture shows what the product answers (needs Pillow and httpx).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import textwrap
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

PANEL = 320  # px, each image panel


def ask(url: str, model: str, image: Path) -> dict:
    response = httpx.post(f"{url}/v1/models/{model}/inspect", params={"heatmap": "overlay"},
                          content=image.read_bytes(), headers={"Content-Type": "image/png", "X-Line-Id": "line-1"},
                          timeout=60)
    response.raise_for_status()
    return response.json()


def answer_text(answer: dict) -> str:
    shown = {k: v for k, v in answer.items() if k != "heatmap" and v is not None}
    shown["regions"] = shown.get("regions", [])[:2]
    return json.dumps(shown, indent=1)


def compose(frame: Image.Image, heatmap: Image.Image, text: str) -> Image.Image:
    font = ImageFont.load_default(size=13)
    lines = [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, 64) or [""]]
    text_width = 470
    height = max(PANEL + 30, 16 * len(lines) + 20)
    canvas = Image.new("RGB", (2 * PANEL + text_width + 40, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, title) in enumerate(((frame, "frame"), (heatmap, "heat map (green = threshold)"))):
        canvas.paste(img.convert("RGB").resize((PANEL, PANEL)), (10 + i * (PANEL + 10), 25))
        draw.text((10 + i * (PANEL + 10), 5), title, fill="black", font=font)
    for j, line in enumerate(lines):
        draw.text((2 * PANEL + 30, 10 + 16 * j), line, fill="black", font=font)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="tray")
    args = parser.parse_args()
    answer = ask(args.url, args.model, args.image)
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"]["png_base64"])))
    compose(Image.open(args.image), heatmap, answer_text(answer)).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
