"""Progress bars for the long loops (the corruption sweep, ...), drawn only when a person watches.

Whether anyone watches is the entry point's call (``--json``, a Prefect worker and the tests do
not): a stage function says so for its extent with :func:`showing_progress`, and a loop deep
inside a package asks :func:`progress_bar` — so the flag does not travel through every signature
between them. A loop may also pass ``enabled`` explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SHOW: ContextVar[bool] = ContextVar("imgflow_show_progress", default=False)


@contextmanager
def showing_progress(show: bool = True) -> Iterator[None]:
    """Within this block (this thread or task), :func:`progress_bar` draws its bars when ``show``."""
    token = _SHOW.set(show)
    try:
        yield
    finally:
        _SHOW.reset(token)


def _noop(n: int = 1) -> None:
    """The ``advance`` of a bar nobody sees."""


@contextmanager
def progress_bar(
    total: int, *, description: str, enabled: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n=1)`` for ``total`` units of work: a rich bar on stderr when enabled
    (``None``: as the enclosing :func:`showing_progress` says; off outside one), else a no-op.

    ``advance`` may be called from worker threads (rich's progress is thread-safe). Outside a
    terminal rich prints the finished bar once, so a log file gets one line per bar.
    """
    show = _SHOW.get() if enabled is None else enabled
    if not show or total <= 0:
        yield _noop
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
