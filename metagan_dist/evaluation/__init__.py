"""Evaluation: feature space (features.py) and sample-quality metrics (metrics.py) for adapted GANs."""
