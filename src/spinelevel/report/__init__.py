"""Figures and review pages: level overlays of runs, the confusion matrix and training-history plots.

Plotting modules import matplotlib inside their functions (Agg backend), so importing this package
costs nothing.
"""

__all__: list[str] = []
