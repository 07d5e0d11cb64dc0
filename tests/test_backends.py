"""server/vbserve/backends: the one backend URL parser, key validation, the `Backend` lifecycle,
and that the package stays the lowest layer (imports nothing else of ours)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vbserve.backends import (
    Backend,
    BackendInputError,
    BackendUnavailableError,
    FieldError,
    parse_backend_url,
    validate_key,
)


@pytest.mark.parametrize(
    ("url", "kind", "path"),
    [
        ("sqlite:///var/a.db", "sqlite", Path("var/a.db")),
        ("sqlite:////abs/a.db", "sqlite", Path("/abs/a.db")),
        ("plain/a.db", "sqlite", Path("plain/a.db")),
        ("redis://h:6379/0", "redis", None),
        ("rediss://h:6380/1", "redis", None),
        ("redis+cluster://h:7000", "redis", None),
        ("rediss+cluster://h:7000", "redis", None),
    ],
)
def test_backend_urls(url: str, kind: str, path: Path | None) -> None:
    where = parse_backend_url(url, "store_url")
    assert (where.kind, where.url, where.path) == (kind, url, path)


@pytest.mark.parametrize("url", ["", None, 5, "http://x", "sqlite:///", "sqlite:///:memory:", "sqlite:///a://b"])
def test_a_bad_backend_url_names_the_setting(url: object) -> None:
    with pytest.raises(BackendInputError) as info:
        parse_backend_url(url, "jobs_url")
    assert info.value.field == "jobs_url" and isinstance(info.value, ValueError)


def test_validate_key_raises_the_callers_error() -> None:
    class MyError(FieldError):
        pass

    assert validate_key("name", "a.b-c_9") == "a.b-c_9"
    for bad in ("", ".hidden", "a/b", "{tag}", "x" * 129, 3):
        with pytest.raises(BackendInputError):
            validate_key("name", bad)
        with pytest.raises(MyError) as info:
            validate_key("name", bad, error=MyError)
        assert info.value.field == "name"


class _Probe(Backend):
    backend = "probe"
    description = "probe backend"
    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(self) -> None:
        super().__init__()
        self.closed_calls = 0

    def call(self, fail: bool) -> str:
        with self._guard("call"):
            if fail:
                raise sqlite3.OperationalError("disk I/O error")
            return "ok"

    def _ping(self) -> None:
        pass

    def _close(self) -> None:
        self.closed_calls += 1


def test_backend_turns_driver_failures_into_its_unavailable_error_and_closes_once() -> None:
    seen = []
    with _Probe() as probe:
        probe.on_latency = lambda operation, seconds: seen.append(operation)
        assert probe.call(fail=False) == "ok"
        with pytest.raises(BackendUnavailableError) as info:
            probe.call(fail=True)
        assert info.value.backend == "probe" and "disk I/O error" in info.value.reason
        assert info.value.kind == "unavailable"
        probe.ping()
    assert seen == ["call", "call", "ping"]
    probe.close()
    assert probe.closed_calls == 1
    with pytest.raises(BackendUnavailableError, match="probe backend is closed"):
        probe.ping()
