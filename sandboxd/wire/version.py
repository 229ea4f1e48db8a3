"""The package version and the wire API version, importable without anything else."""

__version__ = "0.2.0"
API_VERSION = 1
