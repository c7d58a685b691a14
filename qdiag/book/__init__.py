"""The book: execute the notebooks with papermill, glue their numbers and figures, build the HTML.

    python -m qdiag.book                     # the book's parameters
    python -m qdiag.book --tier classroom    # a classroom-sized run
    python -m qdiag.book --smoke             # the notebooks' own (small) default parameters
"""

from .build import build, execute, glue_figure, glue_findings, main, render, status_page, tier_parameters

__all__ = ["build", "execute", "glue_figure", "glue_findings", "main", "render", "status_page", "tier_parameters"]
