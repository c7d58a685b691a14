"""Floor 3, results as people read them: figures (``plots``) and what a run records about itself
(``meta``)."""
