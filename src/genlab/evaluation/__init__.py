"""Evaluation: the dataset's feature extractor, sample metrics, likelihood metrics, report."""
