"""Functional twins of the metrics: one call on a full set of inputs, no state."""

from metrics.functional.attack_success_rate import attack_success_rate
from metrics.functional.attack_success_rate_generalisation import attack_success_rate_generalisation
from metrics.functional.backdoor_score import backdoor_score
from metrics.functional.caption_scores import bleu4, caption_scores, cider_d, rouge_l
from metrics.functional.cross_trigger_interaction import cross_trigger_interaction
from metrics.functional.domain_shift import ks_statistic, similarity_ks
from metrics.functional.edit_quality import edit_accuracy, edit_quality
from metrics.functional.generative_attack_success_rate import generative_attack_success_rate
from metrics.functional.image_attack_success_rate import (
    image_attack_success_rate,
    image_target_hits,
    judged_attack_success_rate,
)
from metrics.functional.image_distance import per_image_mse
from metrics.functional.shapley import coalition_index, coalition_order, interaction_index, shapley_values
from metrics.functional.string_rules import DEFAULT_REFUSAL_PHRASES, available_rules, get_rule, normalize_text
from metrics.functional.trigger_modality_attribution import trigger_modality_attribution
from metrics.functional.vqa_accuracy import vqa_accuracy, vqa_score

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "attack_success_rate",
    "attack_success_rate_generalisation",
    "available_rules",
    "backdoor_score",
    "bleu4",
    "caption_scores",
    "cider_d",
    "coalition_index",
    "coalition_order",
    "cross_trigger_interaction",
    "edit_accuracy",
    "edit_quality",
    "generative_attack_success_rate",
    "get_rule",
    "image_attack_success_rate",
    "image_target_hits",
    "interaction_index",
    "judged_attack_success_rate",
    "ks_statistic",
    "normalize_text",
    "per_image_mse",
    "rouge_l",
    "shapley_values",
    "similarity_ks",
    "trigger_modality_attribution",
    "vqa_accuracy",
    "vqa_score",
]
