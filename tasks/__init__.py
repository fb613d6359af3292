"""Thin Prefect @task wrappers over ``components.stages``: retry, caching and logging policy only."""
