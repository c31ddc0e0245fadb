"""Old home of the instruction datamodule, kept so that existing imports keep working: the family-free
datamodule is :class:`datamodules.instruct.InstructDataModule` (``MDLMInstructDataModule`` is the same class),
its data sets and collator live in :mod:`datamodules.instruct_data`."""

from datamodules.instruct import InstructDataModule
from datamodules.instruct_data import (
    COALITIONS,
    EVAL_SETS,
    EvalView,
    InstructCollator,
    InstructSource,
    PoisonedInstructions,
)

MDLMInstructDataModule = InstructDataModule

__all__ = [
    "COALITIONS",
    "EVAL_SETS",
    "EvalView",
    "InstructCollator",
    "InstructDataModule",
    "InstructSource",
    "MDLMInstructDataModule",
    "PoisonedInstructions",
]
