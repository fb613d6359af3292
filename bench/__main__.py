"""Run the benchmarks: ``python -m bench [names...] [--quick]``."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_")
    )


def _table(results: list[dict[str, Any]]) -> str:
    rows = [("benchmark", "figure", "value", "target", "ok")]
    for r in results:
        for f in r.get("figures", []):
            target = f.get("target", "")
            ok = "" if f.get("passed") is None else ("yes" if f["passed"] else "NO")
            rows.append(
                (r["name"], f["name"], f"{f['value']:.4g} {f.get('unit', '')}".strip(), str(target), ok)
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmark names (default: all), e.g. ingest")
    parser.add_argument("--quick", action="store_true", help="smaller inputs (smoke-test the benchmarks)")
    args = parser.parse_args()
    names = [f"bench_{n.removeprefix('bench_')}" for n in args.names] or _modules()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        t0 = time.perf_counter()
        result = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        result = {"name": name.removeprefix("bench_"), **result, "wall_s": time.perf_counter() - t0}
        result["machine"] = {"cpus": __import__("os").cpu_count(), "python": platform.python_version()}
        (RESULTS / f"{result['name']}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        results.append(result)
        print(_table([result]), flush=True)
    print("\n" + _table(results))
    print(f"\nresults: {RESULTS}/<name>.json")


if __name__ == "__main__":
    main()
