"""Checks of single model-card fields, one line per problem naming the card: shared by the card
parser (:mod:`gpupath.detect.card`) and each decoder's output parser (:mod:`gpupath.detect.decoders`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpupath.errors import ConfigError

__all__ = ["card_error", "choice", "refuse_unknown_keys", "threshold", "output_name", "optional_output_name"]


def card_error(card: Path, what: str) -> ConfigError:
    """``ConfigError("<card>: <what>")``."""
    return ConfigError(f"{card}: {what}")


def choice(card: Path, key: str, value: Any, allowed: tuple[str, ...]) -> Any:
    """``value`` when it is one of ``allowed``; else a ConfigError naming ``key`` and the choices."""
    if value not in allowed:
        raise card_error(card, f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def refuse_unknown_keys(card: Path, section: str, got: dict[str, Any], allowed: set[str]) -> None:
    """A ConfigError listing the keys of ``got`` outside ``allowed`` (a typo must not change what is decoded)."""
    extra = sorted(set(got) - allowed)
    if extra:
        raise card_error(card, f"unknown key(s) in {section}: {', '.join(extra)} "
                               f"(allowed: {', '.join(sorted(allowed))})")


def threshold(card: Path, d: dict[str, Any]) -> float:
    """``output.threshold`` (default 0.5), a score in [0, 1]."""
    thr = d.get("threshold", 0.5)
    if not (isinstance(thr, int | float) and 0 <= thr <= 1):
        raise card_error(card, f"output.threshold must be in [0, 1], got {thr!r}")
    return float(thr)


def output_name(card: Path, d: dict[str, Any], key: str, decoder: str) -> str:
    """``output.<key>``, a required ONNX output name."""
    value = d.get(key)
    if not isinstance(value, str):
        raise card_error(card, f"output.{key} must name an ONNX output for the {decoder} decoder")
    return value


def optional_output_name(card: Path, d: dict[str, Any], key: str, what: str = "") -> str | None:
    """``output.<key>``, an ONNX output name or absent (None)."""
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise card_error(card, f"output.{key} must name an ONNX output{what} or be absent, got {value!r}")
    return value
