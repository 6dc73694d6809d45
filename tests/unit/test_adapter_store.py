"""The adapter store on a real directory with real PEFT adapters: round trips, atomic replace,
delete, what crashed writes leave behind, fsync, and a writer killed with SIGKILL mid-put."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from adapters.errors import AdapterExistsError, AdapterStoreError, AdapterValidationError
from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest, ManifestError
from adapters.store import ROUTER_DIR, AdapterRecord, AdapterStore
from adapters.validation import BaseModelInfo, validate_adapter
from service.bundled_model import HF_ID, SERVED_NAME
from service.router_store import RouterStore

REPO = Path(__file__).resolve().parents[2]


def manifest_for(
    adapter: Path, name: str, *, description: str = "", training_prompts: tuple[str, ...] = ()
) -> AdapterManifest:
    """Validate the adapter as the gateway will, and describe it."""
    base = BaseModelInfo(SERVED_NAME, frozenset({SERVED_NAME, HF_ID}))
    spec = validate_adapter(
        (adapter / CONFIG_FILE).read_bytes(), adapter / WEIGHTS_FILE, base=base, max_rank=16
    )
    return AdapterManifest.from_spec(
        name,
        spec,
        description=description,
        examples=("What does clause 4 mean?",),
        threshold=0.42,
        training_prompts=training_prompts,
    )


def put(
    store: AdapterStore, name: str, adapter: Path, *, replace: bool = False, description: str = ""
) -> AdapterRecord:
    manifest = manifest_for(adapter, name, description=description)
    return store.put(
        name, (adapter / CONFIG_FILE).read_bytes(), adapter / WEIGHTS_FILE, manifest, replace=replace
    )


def assert_complete(record: AdapterRecord) -> None:
    """The record's files are the ones its manifest describes."""
    weights = (record.path / WEIGHTS_FILE).read_bytes()
    assert hashlib.sha256(weights).hexdigest() == record.manifest.sha256
    assert json.loads((record.path / CONFIG_FILE).read_text())["peft_type"] == "LORA"
    assert AdapterManifest.from_json((record.path / MANIFEST_FILE).read_bytes()) == record.manifest


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# ---------------------------------------------------------------------------- round trips


def test_put_get_list_round_trip(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    record = put(store, "legal", lora_adapter, description="contracts")

    assert store.get("legal") == record
    assert store.list() == [record]
    assert store.path("legal") == record.path
    assert_complete(record)
    assert (record.path / CONFIG_FILE).read_bytes() == (lora_adapter / CONFIG_FILE).read_bytes()
    manifest = record.manifest
    assert (manifest.name, manifest.description, manifest.rank, manifest.alpha) == (
        "legal",
        "contracts",
        8,
        16.0,
    )
    assert (manifest.examples, manifest.threshold, manifest.base_model) == (
        ("What does clause 4 mean?",),
        0.42,
        HF_ID,
    )
    assert manifest.target_modules == ("q_proj", "v_proj")
    assert manifest.created_at.utcoffset() is not None
    assert json.loads((record.path / MANIFEST_FILE).read_text())["created_at"].endswith("Z")
    # The name is a link the engine's filesystem resolver can follow; a new store sees the same.
    assert (root / "legal" / CONFIG_FILE).is_file()
    assert (root / "legal").resolve() == record.path.resolve()
    assert AdapterStore(root).list() == [record]
    assert visible(root) == [".versions", "legal"]


def test_training_prompts_round_trip(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    prompts = ("How do I freeze my card?", "Où est ma carte ?", "What is my PIN?")
    manifest = manifest_for(lora_adapter, "banking", training_prompts=prompts)
    record = store.put(
        "banking",
        (lora_adapter / CONFIG_FILE).read_bytes(),
        lora_adapter / WEIGHTS_FILE,
        manifest,
        replace=False,
    )

    assert record.manifest.training_prompts == prompts
    assert json.loads((record.path / MANIFEST_FILE).read_text())["training_prompts"] == list(prompts)
    assert AdapterStore(root).get("banking") == record
    assert_complete(record)


def test_a_manifest_written_before_training_prompts_is_read_with_none(root: Path, lora_adapter: Path) -> None:
    record = put(AdapterStore(root), "legal", lora_adapter)
    old = json.loads((record.path / MANIFEST_FILE).read_text())
    del old["training_prompts"]
    (record.path / MANIFEST_FILE).write_text(json.dumps(old))

    reread = AdapterStore(root).get("legal")
    assert reread is not None
    assert reread.manifest == record.manifest
    assert reread.manifest.training_prompts == ()
    assert reread.manifest.examples == ("What does clause 4 mean?",)


@pytest.mark.parametrize("value", ["one prompt", None, [1, 2], {"a": "b"}, ["ok", None]])
def test_training_prompts_that_are_not_a_list_of_strings_are_refused(
    lora_adapter: Path, value: object
) -> None:
    data = json.loads(manifest_for(lora_adapter, "legal").to_json())
    with pytest.raises(ManifestError, match="training_prompts"):
        AdapterManifest.from_json(json.dumps({**data, "training_prompts": value}).encode())


def test_list_is_sorted_and_unknown_names_are_none(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    for name in ("b", "a.2", "a"):
        put(store, name, lora_adapter)
    assert [r.name for r in store.list()] == ["a", "a.2", "b"]
    assert store.get("zzz") is None
    assert store.get("../store") is None
    with pytest.raises(KeyError):
        store.path("zzz")


def test_duplicate_name_refused(root: Path, lora_adapter: Path, other_lora_adapter: Path) -> None:
    store = AdapterStore(root)
    first = put(store, "legal", lora_adapter)
    with pytest.raises(AdapterExistsError, match="replace") as caught:
        put(store, "legal", other_lora_adapter)
    assert caught.value.name == "legal"
    assert store.list() == [first]
    assert visible(root) == [".versions", "legal"]
    assert len(list((root / ".versions").iterdir())) == 1


@pytest.mark.parametrize("name", ["", "Legal", "../x", ".versions", ".tmp-x", "a/b"])
def test_bad_names_refused(root: Path, lora_adapter: Path, name: str) -> None:
    store = AdapterStore(root)
    manifest = manifest_for(lora_adapter, name)
    with pytest.raises(AdapterStoreError, match="invalid adapter name"):
        store.put(name, b"{}", lora_adapter / WEIGHTS_FILE, manifest, replace=True)
    assert visible(root) == [".versions"]


def test_manifest_for_another_name_refused(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    with pytest.raises(AdapterStoreError):
        store.put("a", b"{}", lora_adapter / WEIGHTS_FILE, manifest_for(lora_adapter, "b"), replace=False)


def test_weights_changed_since_validation_refused(
    root: Path, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    store = AdapterStore(root)
    manifest = manifest_for(lora_adapter, "legal")  # validated one file...
    with pytest.raises(AdapterValidationError, match="changed"):  # ...then another is copied
        store.put("legal", b"{}", other_lora_adapter / WEIGHTS_FILE, manifest, replace=False)
    assert store.list() == []
    assert visible(root) == [".versions"]
    assert list((root / ".versions").iterdir()) == []


# ---------------------------------------------------------------------------- replace and delete


def test_replace_swaps_to_the_new_version(root: Path, lora_adapter: Path, other_lora_adapter: Path) -> None:
    store = AdapterStore(root)
    old = put(store, "legal", lora_adapter, description="one")
    new = put(store, "legal", other_lora_adapter, replace=True, description="two")

    assert store.get("legal") == new
    assert new.path != old.path
    assert new.manifest.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert_complete(new)
    assert_complete(old)  # kept for requests still running on it...
    put(store, "legal", lora_adapter, replace=True, description="three")
    assert not old.path.exists()  # ...until the next replace
    assert len(list((root / ".versions").iterdir())) == 2


def test_replace_of_an_absent_name_creates_it(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    assert put(store, "legal", lora_adapter, replace=True) == store.get("legal")


def test_old_version_readable_until_the_swap_and_new_after(
    root: Path, lora_adapter: Path, other_lora_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(root)
    put(store, "legal", lora_adapter, description="one")
    seen: list[str | None] = []
    real_replace = os.replace

    def observe_swap(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        def description() -> str | None:
            record = store.get("legal")
            return None if record is None else record.manifest.description

        seen.append(description())  # the new version is fully written by now
        seen.append(AdapterStore(root).list()[0].manifest.description)  # a restart here
        real_replace(src, dst)
        seen.append(description())

    monkeypatch.setattr(os, "replace", observe_swap)
    put(store, "legal", other_lora_adapter, replace=True, description="two")
    assert seen == ["one", "one", "two"]


def test_readers_never_see_a_missing_or_mixed_adapter(
    root: Path, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    store = AdapterStore(root)
    put(store, "legal", lora_adapter, description="a")
    stop = threading.Event()
    problems: list[str] = []
    reads = 0

    def read_forever() -> None:
        nonlocal reads
        while not stop.is_set():
            record = store.get("legal")
            try:
                assert record is not None, "no adapter during a replace"
                assert_complete(record)
            except (AssertionError, OSError) as exc:  # OSError: a version pruned mid-read
                problems.append(repr(exc))
            reads += 1

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for i in range(20):
            adapter, label = (other_lora_adapter, "b") if i % 2 == 0 else (lora_adapter, "a")
            put(store, "legal", adapter, replace=True, description=label)
    finally:
        stop.set()
        reader.join()
    assert problems == []
    assert reads > 20


def test_delete(root: Path, lora_adapter: Path, other_lora_adapter: Path) -> None:
    store = AdapterStore(root)
    put(store, "legal", lora_adapter)
    put(store, "legal", other_lora_adapter, replace=True)  # two versions on disk
    kept = put(store, "medical", lora_adapter)

    assert store.delete("legal") is True
    assert store.get("legal") is None
    assert store.list() == [kept]
    assert visible(root) == [".versions", "medical"]
    assert [p.name for p in (root / ".versions").iterdir()] == [kept.path.name]
    assert store.delete("legal") is False
    assert store.delete("never-there") is False
    assert store.delete("../store") is False
    assert put(store, "legal", lora_adapter) == store.get("legal")  # the name is free again


# ---------------------------------------------------------------------------- leftovers and foreign entries


def crash_leftovers(root: Path, adapter: Path) -> list[Path]:
    """What a put killed at each step leaves: a half-written scratch dir, a staged link, a
    complete version never linked."""
    scratch = root / f".tmp-{uuid.uuid4().hex}"
    scratch.mkdir()
    (scratch / WEIGHTS_FILE).write_bytes((adapter / WEIGHTS_FILE).read_bytes()[:1000])
    staged = root / f".tmp-{uuid.uuid4().hex}"
    staged.symlink_to(f".versions/legal-{uuid.uuid4().hex}")
    orphan = root / ".versions" / f"orphan-{uuid.uuid4().hex}"
    orphan.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (orphan / name).write_bytes((adapter / name).read_bytes())
    (orphan / MANIFEST_FILE).write_bytes(manifest_for(adapter, "orphan").to_json())
    return [scratch, staged, orphan]


def test_leftovers_of_crashed_writes_are_swept_at_start(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    kept = put(store, "legal", lora_adapter)
    leftovers = crash_leftovers(root, lora_adapter)

    assert AdapterStore(root).list() == [kept]  # fresh ones: maybe another gateway's write
    assert all(os.path.lexists(p) for p in leftovers)
    assert AdapterStore(root, stale_after_s=0).list() == [kept]
    assert not any(os.path.lexists(p) for p in leftovers)
    assert visible(root) == [".versions", "legal"]
    assert [p.name for p in (root / ".versions").iterdir()] == [kept.path.name]


def test_entries_without_a_valid_manifest_are_ignored(
    root: Path, lora_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AdapterStore(root)
    kept = put(store, "legal", lora_adapter)
    (root / "junk").mkdir()  # no manifest
    (root / "bad").mkdir()
    (root / "bad" / MANIFEST_FILE).write_text("{not json")
    (root / "renamed").symlink_to(f".versions/{kept.path.name}")  # manifest names "legal"
    (root / "escape").symlink_to(lora_adapter)  # outside .versions
    (root / "gone").symlink_to(f".versions/gone-{uuid.uuid4().hex}")
    (root / "notes.txt").write_text("operator notes")
    (root / "Upper").mkdir()

    with caplog.at_level(logging.WARNING, logger="adapters.store"):
        fresh = AdapterStore(root, stale_after_s=0)
    assert fresh.list() == [kept]
    for name in ("junk", "bad", "renamed", "escape", "gone", "notes.txt", "Upper"):
        assert name in caplog.text
        assert os.path.lexists(root / name)  # ignored, not deleted: they are not the store's


def test_the_router_store_beside_the_adapters_is_left_alone(
    root: Path, lora_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = put(AdapterStore(root), "legal", lora_adapter)
    routers = RouterStore(root / ROUTER_DIR)
    with routers.locked():
        published = routers.publish(
            {"labels": ["legal"]}, {"w": np.ones(2, dtype=np.float32)}, [("q", "legal")]
        )
    router_scratch = root / ROUTER_DIR / ".tmp-0123456789abcdef0123456789abcdef"
    router_scratch.mkdir()  # a router publish in progress: the router store's to sweep, not ours
    before = sorted(str(p.relative_to(root)) for p in (root / ROUTER_DIR).rglob("*"))

    with caplog.at_level(logging.INFO, logger="adapters.store"):
        store = AdapterStore(root, stale_after_s=0)
    assert store.list() == [kept]
    assert store.get(ROUTER_DIR) is None
    assert not store.delete(ROUTER_DIR)
    assert ROUTER_DIR not in caplog.text  # not even warned about as "not an adapter name"
    assert sorted(str(p.relative_to(root)) for p in (root / ROUTER_DIR).rglob("*")) == before
    current = routers.current()
    assert current is not None
    assert current.meta == published.meta


def test_hand_copied_adapter_is_served_but_not_replaced_in_place(root: Path, lora_adapter: Path) -> None:
    store = AdapterStore(root)
    record = put(store, "legal", lora_adapter)
    manual = root / "manual"
    manual.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (manual / name).write_bytes((record.path / name).read_bytes())
    (manual / MANIFEST_FILE).write_bytes(manifest_for(lora_adapter, "manual").to_json())

    assert store.get("manual") is not None
    assert store.path("manual") == manual
    with pytest.raises(AdapterStoreError, match="plain directory"):
        put(store, "manual", lora_adapter, replace=True)
    assert store.delete("manual") is True
    assert visible(root) == [".versions", "legal"]


# ---------------------------------------------------------------------------- durability


def test_files_and_directories_are_fsynced_before_publication(
    root: Path, lora_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(root)
    events: list[str] = []
    real_fsync, real_symlink = os.fsync, os.symlink

    def fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def symlink(src: str, dst: str | os.PathLike[str]) -> None:
        events.append(f"link {Path(dst).name}")
        real_symlink(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "symlink", symlink)
    put(store, "legal", lora_adapter)

    published = events.index("link legal")
    before = [Path(e.removeprefix("fsync ")) for e in events[:published]]
    scratch = before[0].parent
    assert scratch.name.startswith(".tmp-")
    assert {scratch / WEIGHTS_FILE, scratch / CONFIG_FILE, scratch / MANIFEST_FILE, scratch} <= set(before)
    assert {(root / ".versions").resolve(), root.resolve()} <= set(before)
    assert events[published + 1 :] == [f"fsync {root.resolve()}"]  # the link itself is made durable


def test_writer_killed_mid_put_leaves_only_complete_adapters(root: Path, lora_adapter: Path) -> None:
    """A child replaces adapters in a loop and is SIGKILLed at a varying point; every adapter it
    had finished must still be there and complete, and nothing half written may show."""
    manifests = {f"a{i}": manifest_for(lora_adapter, f"a{i}").to_json().decode() for i in range(3)}
    script = _WRITER.format(root=str(root), adapter=str(lora_adapter), manifests=json.dumps(manifests))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    finished: set[str] = set()
    interrupted = 0
    for round_ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        assert child.stdout is not None
        deadline = time.monotonic() + 10
        done = 0
        while done < 3 + round_ and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            finished.add(line.strip())
            done += 1
        time.sleep(0.002 * round_)  # land in a different step of the next put each round
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
        assert done == 3 + round_, "the writer did not get going"

        interrupted += any(p.name.startswith(".tmp-") for p in root.iterdir())
        records = AdapterStore(root).list()  # a restart that sweeps nothing: all still consistent
        assert finished <= {r.name for r in records}
        for record in records:
            assert_complete(record)

    assert interrupted > 0, "no kill landed inside a put: the test proved nothing"
    names = {r.name for r in AdapterStore(root, stale_after_s=0).list()}
    assert finished <= names <= set(manifests)  # one more if the kill fell after its link
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    linked = {os.readlink(root / name).rsplit("/", 1)[-1] for name in names}
    assert {p.name for p in (root / ".versions").iterdir()} == linked


_WRITER = """
import json, sys
from pathlib import Path
from adapters.manifest import AdapterManifest
from adapters.store import AdapterStore

adapter = Path({adapter!r})
manifests = {{n: AdapterManifest.from_json(m.encode()) for n, m in json.loads({manifests!r}).items()}}
config = (adapter / "adapter_config.json").read_bytes()
store = AdapterStore(Path({root!r}))
for i in range(100000):
    name = "a%d" % (i % 3)
    store.put(name, config, adapter / "adapter_model.safetensors", manifests[name], replace=True)
    print(name, flush=True)
"""
