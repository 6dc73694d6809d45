"""The traffic log (``HYBRID_TRAFFIC_LOG``): one JSON line per routed chat request, read back by
``hybrid-serve traffic export`` (labelled prompts) and ``hybrid-serve router drift``.

A line (:class:`TrafficLine`, format 1) holds the time, the request id, the prompt the router
routed on (the last user message, :func:`~service.redaction.redact_prompt` applied, at most
:data:`MAX_PROMPT_CHARS`), whether the client pinned the model, the adapter that answered, the
classifier's probabilities and the class its rule decides, and every passage the index returned
with its collection, cosine similarity and whether the model got it. Answers are not logged.

Writing never waits on the disk in the event loop: :meth:`TrafficLog.record` queues, one writer
thread redacts, appends and flushes in batches. A line is in the operating system's hands
(append + flush, no fsync) within milliseconds of the decision: a gateway killed with ``-9`` loses
only the lines still queued, a power cut also what the system had not written out. When a write
would take the file past ``max_bytes`` it is renamed to ``FILE.1`` (replacing an older one) and a
new file begun, so the log never holds more than twice ``max_bytes``; readers read ``FILE.1``
then ``FILE``. One gateway process per file: several writers would rotate under each other.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from service import request_context
from service.protocol import RouteDecision
from service.redaction import redact_prompt
from service.route_model import BASE

logger = logging.getLogger(__name__)

ROTATED_SUFFIX = ".1"
MAX_PROMPT_CHARS = 2000
"""What ``POST /admin/router/fit`` takes per text: an exported prompt is always fittable."""
QUEUE_LINES = 10_000
"""Lines waiting for the writer; beyond, new ones are dropped (and counted), not waited for."""
_BATCH = 512


class TrafficLogError(ValueError):
    """A file that is not a traffic log; the message names the file and line."""


@dataclass(frozen=True)
class Retrieved:
    """A passage the index returned for the query, before any threshold."""

    collection: str
    chunk_id: str
    score: float


@dataclass(frozen=True)
class Observed:
    """What a routing decision was made on: the score metrics and the traffic log read it."""

    query: str
    pinned: bool
    scores: Mapping[str, float] = field(default_factory=dict)
    """Every class's probability, ``base`` included; empty: no classifier was asked."""
    retrieved: tuple[Retrieved, ...] = ()
    version: int | None = None
    best: str | None = None
    """The most probable adapter."""
    threshold: float | None = None
    """The probability ``best`` needed (its own threshold, or the fitted abstain threshold)."""

    @classmethod
    def of(
        cls,
        query: str,
        pinned: bool,
        scores: Mapping[str, float],
        retrieved: Sequence[Retrieved],
        version: int | None,
        threshold: Callable[[str], float] | None,
    ) -> Observed:
        """``threshold``: the probability an adapter needs (None: no classifier)."""
        adapters = {name: p for name, p in scores.items() if name != BASE}
        best = max(adapters, key=adapters.__getitem__) if adapters else None
        needed = threshold(best) if best is not None and threshold is not None else None
        return cls(query, pinned, dict(scores), tuple(retrieved), version, best, needed)

    @property
    def abstained(self) -> bool:
        """The best adapter fell short of its threshold: the rule gives the base model."""
        if self.best is None or self.threshold is None:
            return False
        return self.scores[self.best] < self.threshold

    def decided(self, adapter: str | None) -> str:
        """The class decided: the one that answered an automatic request; for a pinned one, the
        one the classifier's rule would have chosen."""
        if not self.pinned:
            return adapter or BASE
        return BASE if self.best is None or self.abstained else self.best


# -- the line format


class _Line(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RouterView(_Line):
    """The classifier's side of a decision."""

    version: int | None
    decided: str
    """An adapter's name or ``base``: see :meth:`Observed.decided`."""
    confidence: float
    """The probability of ``decided``."""
    scores: dict[str, float]
    best_adapter: str | None
    threshold: float | None
    abstained: bool


class PassageScore(_Line):
    collection: str
    score: float
    used: bool
    """The model got it (above the threshold, and fitted in the context window)."""


class TrafficLine(_Line):
    v: Literal[1] = 1
    time: datetime
    request_id: str | None
    prompt: str
    pinned: bool
    adapter: str | None
    """The adapter that answered (None: the base model)."""
    rag: bool
    router: RouterView | None
    """None: no classifier scored it (none fitted yet, or the index failed)."""
    retrieval: list[PassageScore]


@dataclass(frozen=True)
class _Pending:
    at: float
    request_id: str | None
    observed: Observed
    adapter: str | None
    used: frozenset[tuple[str, str]]
    rag: bool

    def line(self) -> TrafficLine:
        """Blocking (redaction): the writer thread's work."""
        observed = self.observed
        router = None
        if observed.scores:
            decided = observed.decided(self.adapter)
            router = RouterView(
                version=observed.version,
                decided=decided,
                confidence=round(observed.scores.get(decided, 0.0), 4),
                scores={name: round(p, 4) for name, p in observed.scores.items()},
                best_adapter=observed.best,
                threshold=observed.threshold,
                abstained=observed.abstained,
            )
        # Redacted before the cut, so that an address or number is never kept half; the margin
        # keeps the cut from landing inside text the redaction has not seen.
        prompt = redact_prompt(observed.query[: 2 * MAX_PROMPT_CHARS])[:MAX_PROMPT_CHARS]
        return TrafficLine(
            time=datetime.fromtimestamp(self.at, UTC),
            request_id=self.request_id,
            prompt=prompt,
            pinned=observed.pinned,
            adapter=self.adapter,
            rag=self.rag,
            router=router,
            retrieval=[
                PassageScore(
                    collection=r.collection,
                    score=round(r.score, 4),
                    used=(r.collection, r.chunk_id) in self.used,
                )
                for r in observed.retrieved
            ],
        )


# -- writing


class TrafficLog:
    """Appends :class:`TrafficLine` s to ``path`` from a writer thread. Opening is blocking."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        on_drop: Callable[[int], None] | None = None,
        queue_lines: int = QUEUE_LINES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._on_drop = on_drop
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")
        self._size = os.fstat(self._file.fileno()).st_size
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=queue_lines)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="traffic-log", daemon=True)
        self._thread.start()

    def record(self, observed: Observed, adapter: str | None, route: RouteDecision) -> None:
        """Queue the line of a decision being served; never blocks."""
        if self._closed:
            return
        used = frozenset((source.collection, source.chunk_id) for source in route.rag.sources)
        rid = request_context.request_id()
        pending = _Pending(self._clock(), rid, observed, adapter, used, route.rag.used)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self._dropped(1, "the writer is behind")

    def close(self) -> None:
        """Write every queued line, then stop (blocking: call it in a thread)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._file.close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write([pending for pending in batch if pending is not None])
            if batch[-1] is None:
                return

    def _write(self, batch: list[_Pending]) -> None:
        lines = []
        for pending in batch:
            try:
                lines.append(pending.line().model_dump_json().encode() + b"\n")
            except Exception:  # one odd decision must not stop the log
                logger.exception("traffic log: a line could not be made")
                self._dropped(1, None)
        try:
            self._append(lines)
        except (OSError, ValueError) as exc:  # ValueError: a reopen after rotating failed
            self._dropped(len(lines), f"{self.path}: {exc}")

    def _append(self, lines: list[bytes]) -> None:
        """Append and flush; rotate first whenever the next line would pass ``max_bytes``."""
        chunk: list[bytes] = []
        size = self._size
        for line in lines:
            if size and size + len(line) > self._max_bytes:
                self._flush(chunk)
                chunk = []
                self._rotate()
                size = 0
            chunk.append(line)
            size += len(line)
        self._flush(chunk)

    def _flush(self, chunk: list[bytes]) -> None:
        if chunk:
            data = b"".join(chunk)
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        try:
            os.replace(self.path, rotated(self.path))
        finally:  # renamed or not, writing goes on in a file of that name
            self._file = self.path.open("ab")
            self._size = os.fstat(self._file.fileno()).st_size

    def _dropped(self, count: int, why: str | None) -> None:
        if why is not None:
            logger.error("traffic log: %d line(s) not written: %s", count, why)
        if self._on_drop is not None:
            self._on_drop(count)


# -- reading


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ROTATED_SUFFIX)


def read_log(path: Path, *, since: datetime | None = None) -> Iterator[TrafficLine]:
    """The lines of ``path`` (its rotated ``.1`` first), oldest first, from ``since`` on.
    TrafficLogError for a missing file or a line that is not a traffic line; a last line cut
    short by a crash (no newline) is skipped."""
    files = [p for p in (rotated(path), path) if p.is_file()]
    if not files:
        raise TrafficLogError(f"{path}: no such file")
    for file in files:
        with file.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    line = TrafficLine.model_validate_json(raw)
                except ValidationError as exc:
                    if not raw.endswith(b"\n"):
                        logger.warning("%s:%d: an unfinished last line, skipped", file, number)
                        continue
                    problem = exc.errors()[0]
                    where = ".".join(str(part) for part in problem["loc"]) or "line"
                    raise TrafficLogError(
                        f"{file}:{number}: not a traffic log line ({where}: {problem['msg']})"
                    ) from None
                if since is None or line.time >= since:
                    yield line
