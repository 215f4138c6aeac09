"""How prompts relate to patch tokens: NMI, k-means inertia, cosine similarity and norms per layer, the
statistics SPT's motivating analysis measured (our reconstruction); ``selfprompt.apps.analyze`` plots them."""

from selfprompt.analysis.estimators import default_bins, pairwise_nmi, quantile_bins
from selfprompt.analysis.statistics import (
    STATISTICS,
    BlockInput,
    block_inputs,
    layer_statistics,
    prompt_patch_statistics,
)

__all__ = [
    "STATISTICS",
    "BlockInput",
    "block_inputs",
    "default_bins",
    "layer_statistics",
    "pairwise_nmi",
    "prompt_patch_statistics",
    "quantile_bins",
]
