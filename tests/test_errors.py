"""The broad-guard policy (gpupath.errors.unexpected): expected failures pass as one line, anything else is
logged with its traceback and, in strict mode (the test suite's), raised again."""

from __future__ import annotations

import logging

import pytest

from gpupath.errors import SlideReadError, unexpected

log = logging.getLogger("gpupath.test")


def test_an_expected_failure_passes_silently(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPATH_STRICT", "1")
    with caplog.at_level("DEBUG", logger="gpupath.test"):
        unexpected(log, "a.svs", SlideReadError("a.svs: truncated"))
    assert caplog.records == []


def test_an_unforeseen_failure_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPATH_STRICT", "0")
    try:
        {}["level"]
    except KeyError as exc:
        with caplog.at_level("WARNING", logger="gpupath.test"):
            unexpected(log, "a.svs", exc)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage() == "a.svs: unexpected KeyError: 'level'"
    assert "Traceback" in caplog.text and "{}[\"level\"]" in caplog.text


def test_strict_mode_raises_the_unforeseen_failure_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPATH_STRICT", "1")
    error = ZeroDivisionError("division by zero")
    with pytest.raises(ZeroDivisionError) as raised:
        unexpected(log, "a.svs", error)
    assert raised.value is error
