"""imgflow's library layer: plain Python over torch, timm, MLflow, Ray, Great Expectations, DVC.

Never imports prefect; ``tasks/`` and ``flows/`` wrap what lives here.
"""
