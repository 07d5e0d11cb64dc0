"""`build_once`: the GGUF conversion cache is built by exactly one process, even when
several share the cache directory and start together. A slow fake build stands in for
the real conversion, so no model is needed."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from vbserve.model.loader import build_once

PAYLOAD = "x" * 100_000  # written in chunks, so a half-written file would show


def slow_build(counter: Path):
    def build(tmp: Path) -> None:
        with counter.open("a") as f:
            f.write("built\n")
        time.sleep(0.5)
        with (tmp / "data.txt").open("w") as f:
            for i in range(0, len(PAYLOAD), 10_000):
                f.write(PAYLOAD[i : i + 10_000])
                f.flush()

    return build


def _racer(target: str, counter: str, barrier, results) -> None:
    barrier.wait()  # all processes call build_once at the same moment
    results.put(str(build_once(Path(target), slow_build(Path(counter)))))


def test_concurrent_processes_build_exactly_once(tmp_path: Path) -> None:
    # fork: the children inherit the imported modules (a spawned child would spend
    # seconds importing torch and transformers before it could race).
    ctx = multiprocessing.get_context("fork")
    n = 4
    target = tmp_path / "cache" / "model-abc"  # cache dir does not exist yet
    counter = tmp_path / "builds.log"
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(target), str(counter), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * n
    got = [results.get(timeout=5) for _ in range(n)]
    assert got == [str(target)] * n
    assert counter.read_text() == "built\n"  # exactly one build
    assert (target / "data.txt").read_text() == PAYLOAD
    assert not target.with_name(target.name + ".tmp").exists()


def test_stale_tmp_from_a_crashed_build_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "model-abc"
    tmp = target.with_name(target.name + ".tmp")
    (tmp / "sub").mkdir(parents=True)
    (tmp / "junk.bin").write_bytes(b"half-written")
    (tmp / "sub" / "more-junk").write_text("old")
    counter = tmp_path / "builds.log"

    assert build_once(target, slow_build(counter)) == target

    assert sorted(p.name for p in target.iterdir()) == ["data.txt"]
    assert (target / "data.txt").read_text() == PAYLOAD
    assert not tmp.exists()


def test_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path: Path) -> None:
    target = tmp_path / "model-abc"
    tmp = target.with_name(target.name + ".tmp")

    def failing(tmp_dir: Path) -> None:
        (tmp_dir / "data.txt").write_text("partial")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="conversion crashed"):
        build_once(target, failing)
    assert not target.exists()
    assert not tmp.exists()

    counter = tmp_path / "builds.log"
    assert build_once(target, slow_build(counter)) == target
    assert (target / "data.txt").read_text() == PAYLOAD
    assert counter.read_text() == "built\n"
    # Built now: a further call returns the target without building again.
    assert build_once(target, slow_build(counter)) == target
    assert counter.read_text() == "built\n"
