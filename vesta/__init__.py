"""Vesta: a federated compute daemon for small, trusted groups of personal machines."""

__version__ = "0.1.0"
