"""The one parser of image sizes given on command lines and in settings files."""

from __future__ import annotations


def parse_size(text: str | int, *, multiple: int = 1, minimum: int = 1, what: str = "image size",
               form: str = "N or WxH, e.g. 256 or 320x256", square: bool = True) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"320x256"`` (width x height, as cameras and screens say it) -> (256, 320).

    Returns (height, width), the order of arrays. Both sides must be at least ``minimum`` and
    multiples of ``multiple``; ``square=False`` requires both sides. A ``ValueError`` names the text
    and the rule it breaks.
    """
    raw = str(text).strip().lower()
    try:
        sides = [int(part) for part in raw.split("x")]
    except ValueError:
        sides = []
    if len(sides) not in ((1, 2) if square else (2,)):
        raise ValueError(f"{what} {text!r}: expected {form}")
    width, height = sides if len(sides) == 2 else sides * 2
    if min(width, height) < minimum or width % multiple or height % multiple:
        rule = f"at least {minimum}" + (f" and multiples of {multiple}" if multiple > 1 else "")
        raise ValueError(f"{what} {text!r}: both sides must be {rule}")
    return height, width
