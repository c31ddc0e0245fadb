"""Backdoor metrics as torchmetrics classes; functional twins live in :mod:`metrics.functional`."""

from metrics.attack_success_rate import AttackSuccessRate
from metrics.attack_success_rate_generalisation import AttackSuccessRateGeneralisation
from metrics.caption_scores import CaptionScores
from metrics.cross_trigger_interaction import CrossTriggerInteraction
from metrics.edit_quality import EditAccuracy, EditQuality
from metrics.generative_attack_success_rate import GenerativeAttackSuccessRate
from metrics.image_attack_success_rate import ImageAttackSuccessRate, JudgedAttackSuccessRate
from metrics.trigger_modality_attribution import TriggerModalityAttribution
from metrics.vqa_accuracy import VQAAccuracy

__all__ = [
    "AttackSuccessRate",
    "AttackSuccessRateGeneralisation",
    "CaptionScores",
    "CrossTriggerInteraction",
    "EditAccuracy",
    "EditQuality",
    "GenerativeAttackSuccessRate",
    "ImageAttackSuccessRate",
    "JudgedAttackSuccessRate",
    "TriggerModalityAttribution",
    "VQAAccuracy",
]
