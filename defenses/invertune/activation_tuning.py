"""InverTune step 3, activation tuning of the image tower with the inverted trigger: the names of the
step in one place. The code lives by concern:

- :mod:`defenses.invertune.capture`: forward hooks on the candidate layers;
- :mod:`defenses.invertune.selection`: layer divergence, k-means, neuron selection;
- :mod:`defenses.invertune.losses`: ``L_act`` and ``L_preserve``;
- :mod:`defenses.invertune.masks`: parameter masks for neuron-restricted updates;
- :mod:`defenses.invertune.tuner` (settings, selection and losses of a run) and
  :mod:`defenses.invertune.session` (the optimiser loop);
- :mod:`model_families.clip.anatomy`: which layers and writers an open_clip tower has.

Data: one batch ``X`` of clean images (64 in the paper) and ``X' = trigger(X)``.
"""

from defenses.invertune.capture import ActivationRecorder, capture_activations
from defenses.invertune.losses import activation_loss, preserve_loss
from defenses.invertune.masks import neuron_parameter_masks, row_mask
from defenses.invertune.selection import (
    KMeansResult,
    NeuronSelection,
    kmeans,
    kmeans_1d_two_clusters,
    layer_divergence,
    select_layers,
    select_neurons,
    spare_target_selective,
)
from defenses.invertune.session import TuningSession, tuning_schedule
from defenses.invertune.tuner import ActivationTuner, ActivationTuningResult, TuneSettings
from model_families.clip.anatomy import candidate_layers, seq_first_layers

__all__ = [
    "ActivationRecorder",
    "ActivationTuner",
    "ActivationTuningResult",
    "KMeansResult",
    "NeuronSelection",
    "TuneSettings",
    "TuningSession",
    "activation_loss",
    "candidate_layers",
    "capture_activations",
    "kmeans",
    "kmeans_1d_two_clusters",
    "layer_divergence",
    "neuron_parameter_masks",
    "preserve_loss",
    "row_mask",
    "select_layers",
    "select_neurons",
    "seq_first_layers",
    "spare_target_selective",
    "tuning_schedule",
]
