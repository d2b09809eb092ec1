"""The edit ledger for BaFT: knowledge edits of a language model, kept like commits.

    from ledger import Ledger, load_facts
    with Ledger.init("sqlite:///my.db") as lg:          # or Ledger.open(...)
        [res] = lg.add(load_facts("fact.json"))
        print(res.revision, res.metrics)
        print(lg.generate("The mother tongue of Danielle Darrieux is"))
"""
__version__ = "0.1.0"

from .results import AddResult, EditInfo, EvalReport, RevisionInfo  # noqa: E402
from .baft.config import BaftConfig  # noqa: E402
from .errors import InputError, LedgerError, StateError  # noqa: E402
from .facts import (Fact, FactsRead, LocalityPrompt, PortabilityPrompt, load_facts,  # noqa: E402
                    load_facts_skipping_bad, parse_facts_skipping_bad, parse_facts_text)
from .progress import ProgressEvent  # noqa: E402

# Loaded on first use (PEP 562): `Ledger` brings SQLAlchemy, export.py torch; `ledger --help`
# needs neither and the reading commands need no torch.
_LAZY = {"Ledger": "api", "load_snapshot": "export", "verify_snapshot": "export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Ledger", "AddResult", "EditInfo", "EvalReport", "RevisionInfo", "BaftConfig", "Fact", "FactsRead",
           "LocalityPrompt", "PortabilityPrompt", "ProgressEvent", "load_facts", "load_facts_skipping_bad",
           "parse_facts_text", "parse_facts_skipping_bad", "load_snapshot", "verify_snapshot", "LedgerError",
           "InputError", "StateError", "__version__"]
