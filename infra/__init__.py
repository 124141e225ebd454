"""Cluster manifests and their checks (`python -m infra.check`); not part of the illada package."""
