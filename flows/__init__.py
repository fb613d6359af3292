"""Prefect flows (wiring only) and the ``imgflow`` command line."""
