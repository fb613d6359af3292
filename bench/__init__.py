"""Benchmarks (`make bench`): each ``bench_*.py`` module has ``run(quick: bool) -> dict``.

Figures are reported as ratios against a baseline measured in the same run (this machine is
shared and noisy); raw timings sit beside them. Results go to ``bench/results/<name>.json``
and a table on stdout.
"""
