"""Attack catalogue: image and text triggers, targets, poisoning protocols, plans and manifests."""

from attacks.generative_targets import (
    GENERATIVE_TARGETS,
    ContentInsertion,
    FixedOutput,
    GenerativeTarget,
    SemanticMisclassification,
    TargetedRefusal,
    build_generative_target,
)
from attacks.image_triggers import SIG, BadNet, Blended, ImageTrigger, LowFrequency, WaNet, resolve_size
from attacks.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from attacks.optimized_patch import OptimizedPatch, load_patch_artifact, save_patch_artifact
from attacks.poisoning import PoisonManifest, PoisonPlan, poison_count_from_rate, select_poison_indices
from attacks.protocols import PROTOCOLS, TriggerParts, assign_trigger_parts
from attacks.registry import (
    IMAGE_TRIGGERS,
    PLANNED_ATTACKS,
    TARGETS,
    TEXT_TRIGGERS,
    AttackInfo,
    build_image_trigger,
    build_target,
    build_text_trigger,
    list_attacks,
)
from attacks.targets import OPENAI_IMAGENET_TEMPLATES, ClassTarget, Target, check_class_in_vocabulary
from attacks.text_triggers import CharSequence, Phrase, RareToken, TextTrigger

__all__ = [
    "GENERATIVE_TARGETS",
    "IMAGE_TRIGGERS",
    "OPENAI_IMAGENET_TEMPLATES",
    "PLANNED_ATTACKS",
    "PROTOCOLS",
    "SIG",
    "TARGETS",
    "TEXT_TRIGGERS",
    "AttackInfo",
    "BadNet",
    "Blended",
    "CharSequence",
    "ClassTarget",
    "ContentInsertion",
    "FixedOutput",
    "GenerativeTarget",
    "ImageTrigger",
    "LowFrequency",
    "OptimizedPatch",
    "Phrase",
    "PoisonManifest",
    "PoisonPlan",
    "RareToken",
    "SemanticMisclassification",
    "Target",
    "TargetedRefusal",
    "TextTrigger",
    "TriggerParts",
    "WaNet",
    "assign_trigger_parts",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "build_generative_target",
    "build_image_trigger",
    "build_target",
    "build_text_trigger",
    "check_class_in_vocabulary",
    "list_attacks",
    "load_patch_artifact",
    "poison_count_from_rate",
    "resolve_size",
    "save_patch_artifact",
    "select_poison_indices",
]
