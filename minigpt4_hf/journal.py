"""
The JSON-lines journal of long jobs (batch captioning, the stage-2 data builder): one record per finished item, so
that running the same command again continues where the last run stopped.
"""

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) back until the block is done, then raises it; outside the main thread, does nothing."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals are not delivered here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


class Journal:
    """
    An append-only JSON-lines file of records, each keyed by `key(record)` (or `record[key]` for a field name).

    Every `append` / `extend` is one `write` of whole lines, synced to disk (`fsync`) before it returns, with Ctrl-C
    held back until it is done, so a process interrupted or killed at any moment leaves every earlier record intact. A last line cut short by a kill (the item in flight) is
    removed when the journal is opened again (that item is redone). When an item has several records, the last one
    counts (`records`). Any other line that is not a record is an error naming the line.

    Args:
        path: the file (created at the first append).
        key: the field that identifies an item, or a function of the record.
        what: how messages name a record, e.g. "caption line".
    """

    def __init__(self, path: str | os.PathLike, key: str | Callable[[dict], str] = "image_id", what: str = "record"):
        self.path = Path(path)
        self.key = (lambda record: record[key]) if isinstance(key, str) else key
        self.what = what
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            complete = data.rfind(b"\n") + 1
            logger.warning("%s: removed an incomplete last line left by an interrupted run (that item is redone).",
                           self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
                handle.flush()
                os.fsync(handle.fileno())
            data = data[:complete]
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = str(self.key(record))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{self.path} line {number} is not a {self.what} ({type(error).__name__}: {error}). Was the file "
                    "edited by hand? Fix or delete that line (its item is then redone), or use another file."
                ) from None
            self.records[key] = record

    def append(self, record: dict) -> None:
        """Appends one record (thread-safe); it is on disk when this returns."""
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        """Appends several records in one write (thread-safe); they are on disk when this returns."""
        records = list(records)
        data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
        with _sigint_deferred(), self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
            for record in records:
                self.records[str(self.key(record))] = record

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
