"""The built-in default workflow that ``python -m mzserver`` runs: an echo workflow."""
