"""Lightning callbacks: exports, sample grids, run summaries."""

from callbacks.export import ExportOnFitEnd
from callbacks.sample_grid import PoisonSampleGrid
from callbacks.summary import RunSummary

__all__ = ["ExportOnFitEnd", "PoisonSampleGrid", "RunSummary"]
