"""The one class colour map: overlays, report legends, GeoJSON classifications and the viewer
all colour label index k the same way (pure data, no imaging)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LABEL_COLOURS", "label_colour", "label_colours", "colour_hex"]

# one colour per label (label index modulo the list): bright on pink/purple H&E and on white glass
LABEL_COLOURS = [(0, 200, 70), (255, 170, 0), (0, 170, 255), (230, 30, 30), (190, 0, 230), (0, 0, 0),
                 (120, 80, 0), (255, 0, 150)]


def label_colour(label: int) -> tuple[int, int, int]:
    """RGB colour of a label index in overlays and report legends."""
    return LABEL_COLOURS[int(label) % len(LABEL_COLOURS)]


def label_colours(label_names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Class name -> RGB colour: the name's position in ``label_names`` is its label index."""
    return {name: label_colour(i) for i, name in enumerate(label_names)}


def colour_hex(rgb: Sequence[int]) -> str:
    """``#rrggbb`` of an RGB triple (0-255)."""
    r, g, b = (int(v) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"
