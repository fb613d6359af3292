"""Thin Prefect @task wrappers over ``components.pipeline.stages``: retry, caching and logging policy only."""
