"""Evaluation helpers: the offline model zoo (`zoo`) and real-data loaders (`data`)."""
