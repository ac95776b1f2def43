"""What a run leaves for people: model cards and the manifest (cards.py), results tables
(tables.py), plots (plots.py) and MLflow tracking (tracking.py)."""
