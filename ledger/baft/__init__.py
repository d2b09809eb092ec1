"""BaFT: basis-level representation fine-tuning.

- config.py: the hyperparameters of an edit (stored with it)
- layer.py: the intervention (one trainable block; the fused stack of many)
- hooks.py: intervention sites on a model's decoder blocks
- rows.py: what a training run trains on (rows, and the positions the loss reads)
- objective.py: the loss, the gate's starting key and the stop rule, over a Logits interface
- plain.py, fast.py: the two Logits (the whole model forward; the same values faster)
- packing.py: packed rows and recorded prefixes, for the fast path
- trainer.py: the training loop (train_edits)
"""
from .config import BaftConfig, METHODS, default_layer

# The torch-backed names load on first use (PEP 562): the configuration is read by commands
# that never train or compose, and importing torch costs them a second or more.
_LAZY = {"BaftBlock": "layer", "FusedIntervention": "layer", "REFT_GATE_BIAS": "layer",
         "InterventionSite": "hooks", "attach_sites": "hooks", "detach_sites": "hooks"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BaftConfig", "METHODS", "default_layer", "BaftBlock", "FusedIntervention",
           "REFT_GATE_BIAS", "InterventionSite", "attach_sites", "detach_sites"]
