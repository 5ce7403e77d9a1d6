"""The built-in default workflow that ``python -m server`` runs: an echo workflow."""
