"""Lightning callbacks: divergence checks, exports, sample grids, run summaries."""

from callbacks.divergence import DivergenceGuard
from callbacks.export import ExportOnFitEnd
from callbacks.sample_grid import PoisonSampleGrid
from callbacks.summary import RunSummary

__all__ = ["DivergenceGuard", "ExportOnFitEnd", "PoisonSampleGrid", "RunSummary"]
