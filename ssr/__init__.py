"""SSR-Encoder (selective subject representation, CVPR 2024) in plain PyTorch.

No WebUI imports here: the WebUI glue (``scripts/``) and the trainer (``trainer/``) both
build on this package, so what is trained is exactly what runs.

Modules, one concern each:
- ``image_encoder``: CLIP ViT-L/14 multi-scale features, image and mask preprocessing
- ``clip_checkpoints``: CLIP vision weights from HF / open_clip files (OpenAI's TorchScript after conversion)
- ``query_encoder``: query text -> 77 tokens -> SD text encoder hidden states
- ``subject_encoder``: token-to-patch aligner + subject encoder (462 tokens per subject)
- ``layers``: the canonical attn2 order of the released weights, SD1 widths, model families by context width
- ``attention``: the subject cross-attention branch, installed with hooks
- ``weights``: SSR weight files (official pair, safetensors pair, our single file)
- ``subjects``: user subjects -> cached subject/unconditional contexts
- ``convert``: ``python -m ssr.convert`` converts between the three SSR weight formats (and trusted TorchScript CLIP)
"""
from .attention import (IncompatibleUNetError, SubjectAttention, SubjectAttentionWeights,
                        install_subject_attention, installed_subject_attention)
from .clip_checkpoints import load_clip_image_encoder
from .files import WeightFileError
from .image_encoder import ClipImageEncoder, VisionConfig, clip_preprocess, mask_logit_bias, mask_logit_biases
from .layers import find_cross_attention_layers
from .subject_encoder import SubjectEncoder, SubjectEncoderConfig
from .subjects import EncodedSubjects, Subject, SubjectEmbedder
from .weights import SSRWeights, load_ssr_weights, save_ssr_weights

__version__ = "0.1.0"

__all__ = [
    "ClipImageEncoder", "EncodedSubjects", "IncompatibleUNetError", "SSRWeights", "Subject",
    "SubjectAttention", "SubjectAttentionWeights", "SubjectEmbedder", "SubjectEncoder",
    "SubjectEncoderConfig", "VisionConfig", "WeightFileError", "clip_preprocess",
    "find_cross_attention_layers", "install_subject_attention", "installed_subject_attention",
    "load_clip_image_encoder", "load_ssr_weights", "mask_logit_bias", "mask_logit_biases", "save_ssr_weights",
]
