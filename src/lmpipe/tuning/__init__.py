"""Hyperparameter search: the Optuna study the search stage runs (``study``)."""
