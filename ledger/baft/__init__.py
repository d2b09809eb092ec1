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
from .layer import BaftBlock, FusedIntervention, REFT_GATE_BIAS
from .hooks import InterventionSite, attach_sites, detach_sites

__all__ = ["BaftConfig", "METHODS", "default_layer", "BaftBlock", "FusedIntervention",
           "REFT_GATE_BIAS", "InterventionSite", "attach_sites", "detach_sites"]
