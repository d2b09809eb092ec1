"""BaFT: basis-level representation fine-tuning. Config, the intervention layer, the hooks
that put interventions on a model's decoder blocks, and the trainer of one edit."""
from .config import BaftConfig, METHODS, default_layer
from .layer import BaftBlock, FusedIntervention, REFT_GATE_BIAS
from .hooks import InterventionSite, attach_sites, detach_sites

__all__ = ["BaftConfig", "METHODS", "default_layer", "BaftBlock", "FusedIntervention",
           "REFT_GATE_BIAS", "InterventionSite", "attach_sites", "detach_sites"]
