"""A2ATS retrieval-based KV cache for Hugging Face transformers.

``import a2ats_hf`` registers the attention implementation ``"a2ats"`` (and its mask) with transformers, and
``"a2ats_calibration"``, which :func:`calibrate` switches a model to while it records keys and queries.
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import a2ats_attention_forward
from .cache import A2ATSCache
from .calibration import calibrate, recording_attention
from .codebooks import Codebooks
from .compat import cache_argument
from .config import A2ATSConfig

__version__ = "0.1.0"

AttentionInterface.register("a2ats", a2ats_attention_forward)
AttentionMaskInterface.register("a2ats", sdpa_mask)
AttentionInterface.register("a2ats_calibration", recording_attention)  # used by `calibrate` while it runs
AttentionMaskInterface.register("a2ats_calibration", sdpa_mask)

__all__ = ["A2ATSCache", "A2ATSConfig", "Codebooks", "cache_argument", "calibrate", "__version__"]
