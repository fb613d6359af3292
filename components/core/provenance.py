"""Where a result came from: git commit, data version, parameter fingerprint."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(repo: Path | None = None) -> str:
    """HEAD's sha, with ``-dirty`` when tracked files changed; ``unknown`` outside a git checkout."""
    cwd = str(repo) if repo else None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
