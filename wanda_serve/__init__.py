"""wanda-serve: prune causal LMs layer by layer (Wanda, RIA, magnitude, SparseGPT) to N:M or unstructured sparsity.

    from wanda_serve import Structure, get_method, prune_model
    prune_model(model, calibration_batches, get_method("wanda"), Structure.parse("2:4"))
"""

import importlib

# Resolved on first use, so that importing the package does not import torch: the command line
# (wanda_serve/__main__.py) starts before torch loads and can stop cleanly if Ctrl-C comes meanwhile.
_MODULE_OF = {
    "Owl": "engine", "PruneOptions": "engine", "Refine": "engine", "block_linears": "engine",
    "find_decoder_blocks": "engine", "prune_model": "engine", "WandaServeError": "errors", "METHODS": "methods",
    "get_method": "methods", "Structure": "structure", "audit_linears": "structure", "prune_mask": "structure",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
