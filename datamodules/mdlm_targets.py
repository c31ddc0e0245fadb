"""Old home of the generative targets, kept so that existing imports keep working: they live in
:mod:`attacks.generative_targets` (registered in :data:`attacks.TARGETS`)."""

from attacks.generative_targets import (
    GENERATIVE_TARGETS,
    ContentInsertion,
    FixedOutput,
    GenerativeTarget,
    SemanticMisclassification,
    TargetedRefusal,
    build_generative_target,
)

__all__ = [
    "GENERATIVE_TARGETS",
    "ContentInsertion",
    "FixedOutput",
    "GenerativeTarget",
    "SemanticMisclassification",
    "TargetedRefusal",
    "build_generative_target",
]
