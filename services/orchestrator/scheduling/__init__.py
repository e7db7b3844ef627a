"""Scheduling policy framework: filters, scorers and a picker composed into named profiles."""
