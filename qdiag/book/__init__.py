"""The book: execute the notebooks with papermill, glue their numbers and figures, build the HTML.

    python -m qdiag.book            # everything
    python -m qdiag.book --smoke    # the notebooks' own (small) default parameters
"""

from .build import build, execute, glue_figure, glue_findings, main, status_page

__all__ = ["build", "execute", "glue_figure", "glue_findings", "main", "status_page"]
