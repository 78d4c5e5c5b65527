"""The version, in a module of its own so that any stage can record it without importing the API."""

__version__ = "0.1.0"
