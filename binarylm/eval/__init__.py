"""Evaluation: language-modelling metrics and baselines."""
