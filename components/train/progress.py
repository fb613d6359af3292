"""Training progress on the driver's console: rank 0 sends events, the driver draws them with rich.

Rank 0 sends through a channel (``put_nowait`` / ``get`` / ``empty``): a :class:`ProgressFile` when
the workers share the driver's disk (a lean local runtime), else a Ray queue (made by
:func:`components.train.ray_adapter.progress_channel`). Events: ``{"type": "start", "start_epoch"}``,
``{"type": "batch", "epoch", "batch", "total", "loss"}`` and ``{"type": "epoch", **epoch metrics}``.

By default the display is one bar for the running epoch (its batches), left on screen as one line
with the last epoch's validation numbers; ``verbose`` adds an epochs bar and one line per epoch.
"""

from __future__ import annotations

import json
import logging
import queue as queue_mod
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ProgressFile:
    """Progress events as JSON lines in a file, read back in order: the channel of a lean local
    runtime, whose workers write to the driver's disk. It offers what the driver and rank 0 use of
    ``ray.util.queue.Queue`` (``put_nowait``, ``get``, ``empty``) without the queue's actor process:
    every Ray actor's main thread wakes ~100 times a second to check for signals (measured), and on a
    small machine each wake-up takes a core from training.
    """

    def __init__(self, path: str | Path, poll_s: float = 0.2) -> None:
        self.path, self.poll_s = str(path), poll_s
        self._offset, self._pending = 0, deque[dict[str, Any]]()

    def put_nowait(self, event: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:  # one writer (rank 0), whole lines
                f.write(json.dumps(event) + "\n")
        except OSError as e:  # a progress display never stops training
            logger.warning("progress event not written to %s: %s", self.path, e)

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next read
        self._offset += len(complete)
        self._pending.extend(json.loads(line) for line in complete.splitlines() if line.strip())

    def get(self, block: bool = True, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._read_new()
            if self._pending:
                return self._pending.popleft()
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise queue_mod.Empty
            time.sleep(self.poll_s)

    def empty(self) -> bool:
        self._read_new()
        return not self._pending


class ProgressSender:
    """Rank 0's progress events for the driver's display, cheap enough to leave on.

    Batch events are throttled to at most one per ``interval_s``, plus each epoch's last batch: a
    Ray queue's ``put`` waits for the queue actor (a fire-and-forget call would not: but the queue
    is an async actor, which runs calls out of order), and one per 2% of an epoch cost ~10% of the
    steps on 2 busy cores. ``queue``: a ``ray.util.queue.Queue`` or a ``ProgressFile``; None (ranks
    > 0): a no-op.
    """

    def __init__(self, queue: Any, interval_s: float = 0.5) -> None:
        self._queue, self._interval, self._last = queue, interval_s, float("-inf")

    def send(self, event: dict[str, Any]) -> None:
        if self._queue is not None:
            self._queue.put_nowait(event)

    def batch(self, epoch: int, i: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if i != total - 1 and now - self._last < self._interval:
            return
        self._last = now
        self.send({"type": "batch", "epoch": epoch, "batch": i + 1, "total": total, "loss": loss})


def epoch_line(ev: dict[str, Any], epochs: int) -> str:
    """One finished epoch for people: ``epoch 3/16: train_loss … val_loss … val_acc … (2.1s)``."""
    return (
        f"epoch {ev['epoch'] + 1}/{epochs}: train_loss {ev['train_loss']:.4f} "
        f"val_loss {ev['val_loss']:.4f} val_acc {ev['val_accuracy']:.4f} ({ev['epoch_seconds']:.1f}s)"
    )


class _Display:
    """The rich bars an event stream draws (see the module docstring for what each mode shows)."""

    def __init__(self, bar: Any, epochs: int, verbose: bool) -> None:
        self.bar, self.epochs, self.verbose = bar, epochs, verbose
        self.epoch_task = bar.add_task("epochs", total=epochs) if verbose else None
        self.batch_task = bar.add_task(f"epoch 1/{epochs}", total=None)
        self.last_val = ""

    def show(self, ev: dict[str, Any]) -> None:
        if ev["type"] == "start":
            if ev["start_epoch"] > 0:  # a resumed run or a restarted worker group
                self.bar.console.log(f"resuming after epoch {ev['start_epoch']} (the last checkpoint)")
        elif ev["type"] == "batch":
            self.bar.update(
                self.batch_task, completed=ev["batch"], total=ev["total"],
                description=f"epoch {ev['epoch'] + 1}/{self.epochs} loss {ev['loss']:.3f}{self.last_val}",
            )  # fmt: skip
        else:
            self.last_val = f" · val_loss {ev['val_loss']:.4f} val_acc {ev['val_accuracy']:.4f}"
            self.bar.update(
                self.batch_task, description=f"epoch {ev['epoch'] + 1}/{self.epochs}{self.last_val}"
            )
            if self.epoch_task is not None:
                self.bar.update(self.epoch_task, completed=ev["epoch"] + 1)
                self.bar.console.log(epoch_line(ev, self.epochs))


def render_progress(events: Any, done: threading.Event, *, epochs: int, show: bool, verbose: bool) -> None:
    """Drain the workers' progress channel into a rich display until ``done`` is set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not show, transient=False) as bar:
        display = _Display(bar, epochs, verbose)
        while True:
            try:
                ev = events.get(block=True, timeout=1.0)
            except (queue_mod.Empty, Exception):
                if done.is_set() and events.empty():
                    return
                continue
            display.show(ev)


@contextmanager
def progress_display(events: Any, *, epochs: int, show: bool, verbose: bool) -> Iterator[None]:
    """Draw ``events`` from a thread while the body (the Ray run) runs; drain them when it ends."""
    done = threading.Event()
    renderer = threading.Thread(
        target=render_progress, args=(events, done), kwargs={"epochs": epochs, "show": show, "verbose": verbose},
        daemon=True,
    )  # fmt: skip
    renderer.start()
    try:
        yield
    finally:
        done.set()
        renderer.join(timeout=10)
