"""What every decoder is: the :class:`Decoder` record the registry holds, and the checks they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gpupath.types import TileBoxes

__all__ = ["Decoder", "OutputSpec", "require_output", "dim_ok", "rank_problem"]


class OutputSpec(Protocol):
    """A parsed ``output:`` section of a card (one dataclass per decoder)."""

    decoder: str
    threshold: float

    @property
    def names(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class Decoder:
    """One decoder: how its card section is read, how its model's outputs are checked, how they are decoded.

    - ``parse(card_path, output_mapping) -> spec``: validate the card's ``output:`` keys (ConfigError
      naming the card on any problem).
    - ``check(spec, outputs, classes) -> problem or None``: the ONNX file's declared output shapes
      (``{name: shape}``, str/None/-1 for dynamic dims) against the spec, before any engine runs.
    - ``decode(outputs, spec, *, input_hw, scale_yx) -> TileBoxes``: an engine's arrays (NumPy or
      CuPy) to boxes in tile px on the host.
    """

    name: str
    spec_type: type
    parse: Callable[[Path, dict[str, Any]], Any]
    check: Callable[[Any, dict[str, tuple], tuple[str, ...]], str | None]
    decode: Callable[..., TileBoxes]


def require_output(outputs: dict[str, Any], name: str, ndim: int) -> Any:
    """``outputs[name]``, which must exist and have ``ndim`` dimensions."""
    if name not in outputs:
        raise KeyError(f"model output {name!r} missing (got {sorted(outputs)})")
    a = outputs[name]
    if a.ndim != ndim:
        raise ValueError(f"model output {name!r} must have {ndim} dims, got shape {tuple(a.shape)}")
    return a


def dim_ok(declared: Any, want: int) -> bool:
    """A declared ONNX dimension that is ``want`` or dynamic."""
    return not isinstance(declared, int) or declared in (want, -1)


def rank_problem(decoder: str, ranks: dict[str | None, int], outputs: dict[str, tuple]) -> str | None:
    """The first output named in ``ranks`` (None entries skipped) that the model lacks or has at another rank."""
    for name, rank in ranks.items():
        if name is None:
            continue
        if name not in outputs:
            return f"output {name!r} ({decoder} decoder) not in the model"
        if len(outputs[name]) != rank:
            return f"output {name!r} has shape {list(outputs[name])}, the {decoder} decoder needs rank {rank}"
    return None
