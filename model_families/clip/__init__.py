"""The contrastive (CLIP) family: open_clip architectures, tiny embedded configs, zero-shot heads, exports, a judge."""

from model_families.clip.export import (
    load_clip,
    load_clip_export,
    load_clip_weights,
    read_export_meta,
    save_clip_export,
)
from model_families.clip.factory import (
    ClipBundle,
    Normalize,
    create_clip,
    model_config,
    register_embedded_configs,
)
from model_families.clip.judge import ClipJudge
from model_families.clip.zero_shot import (
    TEMPLATE_SETS,
    encode_images,
    resolve_templates,
    zero_shot_logits,
    zero_shot_predict,
    zero_shot_weights,
)

__all__ = [
    "TEMPLATE_SETS",
    "ClipBundle",
    "ClipJudge",
    "Normalize",
    "create_clip",
    "encode_images",
    "load_clip",
    "load_clip_export",
    "load_clip_weights",
    "model_config",
    "read_export_meta",
    "register_embedded_configs",
    "resolve_templates",
    "save_clip_export",
    "zero_shot_logits",
    "zero_shot_predict",
    "zero_shot_weights",
]
