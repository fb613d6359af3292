"""``python -m bench active_learning``: the active-learning figures alone (see bench/al_bench.py)."""

from __future__ import annotations

from typing import Any

from bench.al_bench import measure


def run(*, quick: bool = False) -> dict[str, Any]:
    """margin vs random at 200 / 500 labels, the typical cold start at 20, one round's seconds."""
    return measure(quick=quick)
