"""Progress bars are drawn only where the entry point says a person watches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from components.core.progress import progress_bar, showing_progress


def test_no_bar_unless_asked(capfd: pytest.CaptureFixture[str]) -> None:
    with progress_bar(3, description="quiet") as advance:
        advance(3)
    with showing_progress(False), progress_bar(3, description="still quiet") as advance:
        advance(3)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_showing_progress_draws_one_finished_bar_on_stderr_and_ends_with_the_block(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # advanced from worker threads, as the corruption sweep does
    with showing_progress(), progress_bar(8, description="sweep") as advance, ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: advance(1), range(8)))
    out, err = capfd.readouterr()
    assert out == "" and "sweep" in err and "8/8" in err
    with progress_bar(2, description="after") as advance:  # the block is over: quiet again
        advance(2)
    assert capfd.readouterr() == ("", "")


def test_an_explicit_choice_wins_over_the_block(capfd: pytest.CaptureFixture[str]) -> None:
    with showing_progress(), progress_bar(1, description="off", enabled=False) as advance:
        advance(1)
    with progress_bar(1, description="on", enabled=True) as advance:
        advance(1)
    err = capfd.readouterr().err
    assert "off" not in err and "on" in err and "1/1" in err
