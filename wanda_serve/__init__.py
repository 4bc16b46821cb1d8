"""wanda-serve: prune causal LMs layer by layer (Wanda, RIA, magnitude, SparseGPT) to N:M or unstructured sparsity.

    from wanda_serve import Structure, get_method, prune_model
    prune_model(model, calibration_batches, get_method("wanda"), Structure.parse("2:4"))
"""

from wanda_serve.engine import Owl, PruneOptions, Refine, block_linears, find_decoder_blocks, prune_model
from wanda_serve.errors import WandaServeError
from wanda_serve.methods import METHODS, get_method
from wanda_serve.structure import Structure, audit_linears, prune_mask

__all__ = [
    "METHODS", "Owl", "PruneOptions", "Refine", "Structure", "WandaServeError", "audit_linears", "block_linears",
    "find_decoder_blocks", "get_method", "prune_mask", "prune_model",
]
