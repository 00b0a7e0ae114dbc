"""Evaluation: the dataset-specific feature extractor, sample metrics, likelihood metrics, report."""
