"""The embedded world: a small, real multimodal world of coloured shapes that tiny models learn on a CPU."""

from embedded_world.dataset import ShapesWorld
from embedded_world.render import render_scene
from embedded_world.scene import Scene, ShapeObject, sample_rng, sample_scene
from embedded_world.text import CAPTION_TEMPLATES, QUESTIONS, ZERO_SHOT_TEMPLATES, canonical_caption, qa_pairs
from embedded_world.vocabulary import BACKGROUNDS, COLOURS, SHAPES, SIZES

__all__ = [
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "COLOURS",
    "QUESTIONS",
    "SHAPES",
    "SIZES",
    "ZERO_SHOT_TEMPLATES",
    "Scene",
    "ShapeObject",
    "ShapesWorld",
    "canonical_caption",
    "qa_pairs",
    "render_scene",
    "sample_rng",
    "sample_scene",
]
