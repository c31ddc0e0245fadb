"""Lightning callbacks: exports, sample grids, run summaries, random states for exact resumes."""

from callbacks.export import ExportOnFitEnd
from callbacks.rng_state import GlobalRNGState
from callbacks.sample_grid import PoisonSampleGrid
from callbacks.summary import RunSummary

__all__ = ["ExportOnFitEnd", "GlobalRNGState", "PoisonSampleGrid", "RunSummary"]
