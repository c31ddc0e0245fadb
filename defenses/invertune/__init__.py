"""InverTune (arXiv 2506.12411, NDSS 2026): backdoor removal for CLIP-style models in three steps.

The three steps as plain functions with argument dataclasses: :func:`identify` (:class:`IdentifyConfig`),
:func:`invert` (:class:`InvertConfig`) and :func:`tune` (:class:`TuneConfig`), in
:mod:`~defenses.invertune.pipeline`; the callback, the LightningModule and the benchmark call them.

1. :mod:`~defenses.invertune.target_identification`: a universal adversarial perturbation reveals the
   target class (``identify_target``); :mod:`~defenses.invertune.target_confidence` says how sure that is.
2. :mod:`~defenses.invertune.trigger_inversion`: a mask/pattern trigger is inverted for that class
   (``invert_trigger``).
3. :mod:`~defenses.invertune.activation_tuning` (capture, selection, losses, masks, tuner,
   session): the neurons the inverted trigger excites are tuned back to their clean activations
   (``ActivationTuner``); the tower's layers and writers come from :mod:`model_families.clip.anatomy`.

Algorithm notes: ``/work/shared/spec/invertune.md`` in the project workspace.
"""

from defenses.invertune.capture import ActivationRecorder, capture_activations
from defenses.invertune.location_free import AnywherePatchUAP, UnionUAP, identify_union, union_max
from defenses.invertune.losses import activation_loss, preserve_loss
from defenses.invertune.masks import neuron_parameter_masks
from defenses.invertune.pipeline import (
    Identified,
    IdentifyConfig,
    InvertConfig,
    Inverted,
    TuneConfig,
    begin_tuning,
    identify,
    invert,
    tune,
)
from defenses.invertune.selection import (
    KMeansResult,
    NeuronSelection,
    kmeans,
    kmeans_1d_two_clusters,
    layer_divergence,
    select_layers,
    select_neurons,
)
from defenses.invertune.session import TuningSession
from defenses.invertune.target_confidence import (
    DEFAULT_MIN_MARGIN,
    TargetConfidence,
    target_confidence,
    true_target_check,
)
from defenses.invertune.target_identification import (
    CornerPatchUAP,
    LinfUAP,
    TargetIdentification,
    UniversalPerturbation,
    breadth_of,
    identify_target,
    uap_objective,
)
from defenses.invertune.trigger_inversion import (
    InvertedTrigger,
    align_loss,
    embedding_loss,
    invert_trigger,
    inverted_trigger_asr,
    mask_l1_loss,
    similarity_loss,
    ssim,
)
from defenses.invertune.tuner import ActivationTuner, ActivationTuningResult, TuneSettings
from defenses.invertune.zero_shot import encode_images, zero_shot_predict
from model_families.clip.anatomy import candidate_layers

__all__ = [
    "DEFAULT_MIN_MARGIN",
    "ActivationRecorder",
    "ActivationTuner",
    "ActivationTuningResult",
    "AnywherePatchUAP",
    "CornerPatchUAP",
    "Identified",
    "IdentifyConfig",
    "InvertConfig",
    "Inverted",
    "InvertedTrigger",
    "KMeansResult",
    "LinfUAP",
    "NeuronSelection",
    "TargetConfidence",
    "TargetIdentification",
    "TuneConfig",
    "TuneSettings",
    "TuningSession",
    "UnionUAP",
    "UniversalPerturbation",
    "activation_loss",
    "align_loss",
    "begin_tuning",
    "breadth_of",
    "candidate_layers",
    "capture_activations",
    "embedding_loss",
    "encode_images",
    "identify",
    "identify_target",
    "identify_union",
    "invert",
    "invert_trigger",
    "inverted_trigger_asr",
    "kmeans",
    "kmeans_1d_two_clusters",
    "layer_divergence",
    "mask_l1_loss",
    "neuron_parameter_masks",
    "preserve_loss",
    "select_layers",
    "select_neurons",
    "similarity_loss",
    "ssim",
    "target_confidence",
    "true_target_check",
    "tune",
    "uap_objective",
    "union_max",
    "zero_shot_predict",
]
