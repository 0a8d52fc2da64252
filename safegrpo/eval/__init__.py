"""Evaluation: metrics and tables, plots, and one adapter per safety benchmark."""
