"""The package version, stored in every log it writes."""

__version__ = "0.1.0"
