"""Label colours, defined once: the CLI's preview PNGs and the service's page (via ``GET /info``) use these.

Colours are picked for distinctness on a grey-scale scan (no grey, no near-black), in the order of label ids;
beyond the table they repeat.
"""

from __future__ import annotations

# RGB 0-255 for label 1, 2, 3, ... (label 0, background, is never drawn).
COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (0, 128, 128),  # teal
    (170, 110, 40),  # brown
    (128, 0, 0),  # maroon
)


def colour(label: int) -> tuple[int, int, int]:
    """RGB of a foreground label id (>= 1)."""
    if label < 1:
        raise ValueError(f"label {label}: background has no colour")
    return COLOURS[(label - 1) % len(COLOURS)]


def hex_colour(label: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour(label))


def palette(labels: dict[int, str]) -> dict[str, str]:
    """``{"1": "#e6194b", ...}`` for the foreground labels of a model (JSON keys are strings)."""
    return {str(v): hex_colour(v) for v in sorted(labels) if v != 0}
