"""Export backends for MoORE models (imported as ``moorize.exporters``).

The folder is mapped to ``moorize.exporters`` in pyproject.toml so that the
top-level name ``exporters`` (an unrelated PyPI package) is never shadowed.
"""
