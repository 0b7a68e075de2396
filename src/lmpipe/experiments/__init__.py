"""Comparing runs: finding them (git revisions, DVC experiments, MLflow runs), the paired statistics,
and the report."""
