"""Floor 4, the study's seven analyses, side by side; none imports another. Each has a
``run_*`` (a list of specs in, tidy tables out), a ``save_*`` and ``findings`` for the book."""
