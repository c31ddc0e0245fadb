"""Lightning callbacks: divergence checks, exports, sample grids, run summaries, random states for exact
resumes."""

from callbacks.divergence import DivergenceGuard
from callbacks.export import ExportOnFitEnd
from callbacks.rng_state import GlobalRNGState
from callbacks.sample_grid import PoisonSampleGrid
from callbacks.summary import RunSummary

__all__ = ["DivergenceGuard", "ExportOnFitEnd", "GlobalRNGState", "PoisonSampleGrid", "RunSummary"]
