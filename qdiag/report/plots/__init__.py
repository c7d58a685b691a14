"""Figures shared by the chapters and the CLI; each returns a matplotlib Figure. One module per
family of chapters (``output``, ``components``, ``causal``, ``repair``); every figure is importable
from here.

Figures are laid out for the book's page: at most about 9 inches wide (panels stacked rather than
side by side), so that at the page's width of about 760 pixels their text stays near its set size."""

from .base import _panels
from .causal import ablation_figure, injection_figure, patching_figure, recovery_figure
from .components import PAPER_MARKS, attention_figure, cka_figure, mlp_figure, subspace_figure
from .output import cliff_figure, lens_figure, quantizer_figure, rank_figure
from .repair import equal_bytes_figure, pareto_figure, sensitivity_figure

__all__ = [
    'PAPER_MARKS', '_panels', 'ablation_figure', 'attention_figure', 'cka_figure', 'cliff_figure', 'equal_bytes_figure',
    'injection_figure', 'lens_figure', 'mlp_figure', 'pareto_figure', 'patching_figure', 'quantizer_figure',
    'rank_figure', 'recovery_figure', 'sensitivity_figure', 'subspace_figure',
]
