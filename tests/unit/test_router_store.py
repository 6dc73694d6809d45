"""The router store on a real directory: round trips, versions, pruning, shared storage, the
cross-process lock, what crashed writes leave behind, corrupt versions, and readers racing a
publisher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from service.router_store import (
    CURRENT_LINK,
    FIT_DATA_FILE,
    HEAD_FILE,
    LOCK_FILE,
    META_FILE,
    RouterStore,
    RouterStoreError,
    StoredRouter,
)

# Tries the lock without waiting: exit 0 when it got it, 3 when someone else holds it.
_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
sys.exit(0)
"""

ROWS = (
    ("Quelle est la durée du préavis ?", "légal"),
    ("合同第4条是什么意思？", "legal"),
    ("line one\nline two\u2028still the same row 🚀", "general"),
    ('quotes " and \\ backslashes', "general"),
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "adapters" / ".router"


def head(value: float) -> dict[str, npt.NDArray[Any]]:
    return {
        "weight": np.full((3, 4), value, dtype=np.float32),
        "bias": np.arange(4, dtype=np.float32) + np.float32(value),
        "label_ids": np.array([0, 1, 2], dtype=np.int64),
        "counts": np.array([[7, 8]], dtype=np.int32),
    }


def publish(store: RouterStore, value: float = 1.0, **meta: Any) -> StoredRouter:
    with store.locked():
        return store.publish({"labels": ["general", "legal"], "marker": value, **meta}, head(value), ROWS)


def assert_same(a: StoredRouter, b: StoredRouter) -> None:
    assert (a.version, a.path, a.meta, a.fit_rows) == (b.version, b.path, b.meta, b.fit_rows)
    assert a.arrays.keys() == b.arrays.keys()
    for name, array in a.arrays.items():
        assert array.dtype == b.arrays[name].dtype
        np.testing.assert_array_equal(array, b.arrays[name])


def try_lock(root: Path) -> int:
    return subprocess.run([sys.executable, "-c", _TRY_LOCK, str(root / LOCK_FILE)], check=False).returncode


# ---------------------------------------------------------------------------- round trips


def test_nothing_published(root: Path) -> None:
    store = RouterStore(root)
    assert store.current_version() is None
    assert store.current() is None
    with pytest.raises(RouterStoreError, match="000001"):
        store.read(1)


def test_publish_then_read_back(root: Path) -> None:
    store = RouterStore(root)
    arrays = head(0.25)
    arrays["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T  # not contiguous
    with store.locked():
        published = store.publish({"labels": ["général", "legal"], "threshold": 0.4}, arrays, ROWS)

    assert published.version == 1
    assert published.path == root / "versions" / "000001"
    assert os.readlink(root / CURRENT_LINK) == "versions/000001"  # relative: mounts differ
    assert published.meta["labels"] == ["général", "legal"]
    assert published.meta["threshold"] == 0.4
    assert published.meta["version"] == 1
    assert published.meta["created_at"].endswith("Z")
    assert published.fit_rows == ROWS
    assert set(published.arrays) == set(arrays)
    for name, array in arrays.items():
        assert published.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(published.arrays[name], array)

    assert_same(store.read(1), published)
    current = store.current()
    assert current is not None
    assert_same(current, published)

    # The files are the documented formats, readable without this module.
    assert json.loads((published.path / META_FILE).read_text()) == published.meta
    lines = (published.path / FIT_DATA_FILE).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    assert [json.loads(line) for line in lines[:-1]] == [{"text": t, "label": lbl} for t, lbl in ROWS]
    assert "général" in (published.path / META_FILE).read_text(encoding="utf-8")
    assert sorted(p.name for p in published.path.iterdir()) == [FIT_DATA_FILE, HEAD_FILE, META_FILE]


def test_the_store_sets_version_and_created_at(root: Path) -> None:
    store = RouterStore(root)
    published = publish(store, version=99, created_at="yesterday")
    assert published.meta["version"] == 1
    assert published.meta["created_at"] != "yesterday"


def test_versions_increment(root: Path) -> None:
    store = RouterStore(root)
    for expected in (1, 2, 3):
        assert publish(store, float(expected)).version == expected
        assert store.current_version() == expected
    current = store.current()
    assert current is not None
    assert current.meta["marker"] == 3.0
    assert store.read(2).meta["marker"] == 2.0


@pytest.mark.parametrize(
    ("meta", "arrays", "rows", "message"),
    [
        ({"when": object()}, head(1.0), ROWS, "JSON"),
        ({"score": float("nan")}, head(1.0), ROWS, "JSON"),
        ({}, {"w": np.zeros(2, dtype=np.float64)}, ROWS, "float64"),
        ({}, {"w": [1.0, 2.0]}, ROWS, "list"),
        ({}, head(1.0), [("text", 3)], "fit row"),
    ],
)
def test_invalid_input_is_refused_and_nothing_changes(
    root: Path, meta: dict[str, Any], arrays: dict[str, Any], rows: list[tuple[str, Any]], message: str
) -> None:
    store = RouterStore(root)
    first = publish(store)
    with store.locked(), pytest.raises(ValueError, match=message):
        store.publish(meta, arrays, rows)
    assert store.current_version() == first.version
    assert sorted(p.name for p in root.iterdir()) == [LOCK_FILE, CURRENT_LINK, "versions"]
    assert [p.name for p in (root / "versions").iterdir()] == ["000001"]


def test_publish_outside_locked_is_refused(root: Path) -> None:
    store = RouterStore(root)
    with pytest.raises(RuntimeError, match="locked"):
        store.publish({}, head(1.0), ROWS)
    assert store.current_version() is None


# ---------------------------------------------------------------------------- pruning, sharing


def test_pruning_keeps_the_newest(root: Path) -> None:
    store = RouterStore(root, keep=3)
    for value in range(1, 6):
        publish(store, float(value))
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["000003", "000004", "000005"]
    assert store.current_version() == 5
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # removals finished


def test_keep_one_keeps_only_the_current(root: Path) -> None:
    store = RouterStore(root, keep=1)
    publish(store, 1.0)
    publish(store, 2.0)
    assert [p.name for p in (root / "versions").iterdir()] == ["000002"]
    current = store.current()
    assert current is not None
    assert current.meta["marker"] == 2.0


def test_keep_must_be_positive(root: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        RouterStore(root, keep=0)


def test_a_second_store_on_the_same_root_sees_the_published_version(root: Path) -> None:
    writer, reader = RouterStore(root), RouterStore(root)
    assert reader.current() is None
    published = publish(writer, 4.0)
    seen = reader.current()
    assert seen is not None
    assert_same(seen, published)
    # And it publishes on top of it, not over it.
    assert publish(reader, 5.0).version == 2
    assert writer.current_version() == 2


# ---------------------------------------------------------------------------- the lock


def test_locked_excludes_another_process(root: Path) -> None:
    store = RouterStore(root)
    assert try_lock(root) == 0
    with store.locked():
        assert try_lock(root) == 3
    assert try_lock(root) == 0


def test_locked_excludes_another_store_in_this_process(root: Path) -> None:
    first, second = RouterStore(root), RouterStore(root)
    order: list[str] = []
    entered = threading.Event()

    def contender() -> None:
        entered.set()
        with second.locked():
            order.append("second")

    with first.locked():
        thread = threading.Thread(target=contender)
        thread.start()
        entered.wait(5)
        thread.join(0.3)
        assert thread.is_alive()  # still waiting for the lock
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


# ---------------------------------------------------------------------------- crashes, corruption


def test_a_crashed_publish_leaves_the_previous_version_current(root: Path) -> None:
    store = RouterStore(root)
    first = publish(store, 1.0)
    scratch = root / ".tmp-0123456789abcdef0123456789abcdef"
    scratch.mkdir()
    (scratch / META_FILE).write_text('{"version": 2, "lab')  # cut off mid-write
    half = root / "versions" / "000002"  # renamed in, the link never swapped
    half.mkdir()
    (half / META_FILE).write_text(json.dumps({"version": 2}))

    current = store.current()
    assert current is not None
    assert_same(current, first)
    with pytest.raises(RouterStoreError, match="000002"):
        store.read(2)

    assert scratch.exists()
    assert RouterStore(root).current_version() == 1  # a fresh scratch may be a live write elsewhere
    assert scratch.exists()
    restarted = RouterStore(root, stale_after_s=0)
    assert not scratch.exists()
    assert (root / LOCK_FILE).exists()

    # The next publish never reuses the half-written number: a reader may have held it.
    assert publish(restarted, 3.0).version == 3
    current = restarted.current()
    assert current is not None
    assert current.meta["marker"] == 3.0


@pytest.mark.parametrize(
    ("file", "content"),
    [
        (META_FILE, b"{not json"),
        (META_FILE, b"[1, 2]"),
        (META_FILE, json.dumps({"version": 7}).encode()),
        (HEAD_FILE, b"definitely not safetensors"),
        (FIT_DATA_FILE, b'{"text": "a", "label": "b"}\n{"text": "half'),
        (FIT_DATA_FILE, b'{"text": "a"}\n'),
        (FIT_DATA_FILE, b"\xff\xfe\n"),
    ],
)
def test_a_corrupt_current_version_raises_naming_the_file(root: Path, file: str, content: bytes) -> None:
    store = RouterStore(root)
    published = publish(store)
    target = published.path / file
    target.unlink()
    target.write_bytes(content)
    with pytest.raises(RouterStoreError, match=str(target)):
        store.current()
    with pytest.raises(RouterStoreError, match=str(target)):
        store.read(1)


def test_a_link_to_a_missing_version_raises_naming_it(root: Path) -> None:
    store = RouterStore(root)
    publish(store)
    (root / CURRENT_LINK).unlink()
    (root / CURRENT_LINK).symlink_to("versions/000042")
    with pytest.raises(RouterStoreError, match="000042"):
        store.current()


@pytest.mark.parametrize("target", ["elsewhere/000001", "versions/latest", "/abs/versions/000001"])
def test_a_link_outside_the_versions_raises(root: Path, target: str) -> None:
    store = RouterStore(root)
    (root / CURRENT_LINK).symlink_to(target)
    with pytest.raises(RouterStoreError, match=CURRENT_LINK):
        store.current_version()


def test_a_plain_file_where_the_link_belongs_raises(root: Path) -> None:
    store = RouterStore(root)
    (root / CURRENT_LINK).write_text("000001")
    with pytest.raises(RouterStoreError, match="not a symlink"):
        store.current()


# ---------------------------------------------------------------------------- readers vs publisher


def test_readers_racing_publishes_always_see_one_whole_version(root: Path) -> None:
    writer = RouterStore(root, keep=1)  # every publish prunes the version readers were just on
    reader = RouterStore(root)
    publish(writer, 1.0)
    stop = threading.Event()
    seen: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def read_loop() -> None:
        versions = seen.setdefault(threading.get_ident(), [])
        try:
            while not stop.is_set():
                stored = reader.current()
                assert stored is not None
                marker = stored.meta["marker"]
                assert stored.meta["version"] == stored.version == int(marker)
                assert stored.path.name == f"{stored.version:06d}"
                np.testing.assert_array_equal(stored.arrays["weight"], np.full((3, 4), marker, np.float32))
                assert stored.fit_rows == ROWS
                versions.append(stored.version)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=read_loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for value in range(2, 61):
            publish(writer, float(value))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not failures, failures[0]
    for versions in seen.values():
        assert len(set(versions)) > 1  # this reader really did cross swaps
        assert versions == sorted(versions)  # and never went back to a superseded version
