"""Base models: the decoder layers and hidden size of each supported family, the fingerprint
that ties a ledger to its base weights, and the one-line refusals of a bad --model or --device."""
import pytest
import torch

from ledger.errors import InputError, StateError
from ledger.models import (DEFAULT_MODEL, check_device, decoder_layers, fingerprint, hidden_size, load_base,
                           resolve_spec)


@pytest.mark.parametrize("family, path", [("tiny_llama", "model.layers"), ("tiny_gpt2", "transformer.h")])
def test_decoder_layers_and_hidden_size_of_each_family(family, path, request):
    base = load_base(str(request.getfixturevalue(family)))
    assert base.layers is base.model.get_submodule(path) and len(base.layers) == 3
    assert base.hidden_size == hidden_size(base.model) == 64
    with pytest.raises(InputError, match="unsupported model architecture Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_load_base_is_frozen_in_eval_mode_with_a_pad_token(tiny_llama):
    base = load_base(str(tiny_llama))
    assert base.spec == str(tiny_llama.resolve())
    assert not base.model.training and not any(p.requires_grad for p in base.model.parameters())
    assert all(p.dtype == torch.float32 for p in base.model.parameters())
    assert base.tokenizer.pad_token_id is not None


def test_fingerprint_follows_the_weights_only(tiny_llama, tiny_llama_other):
    a, again, other = load_base(str(tiny_llama)), load_base(str(tiny_llama)), load_base(str(tiny_llama_other))
    assert len(a.fingerprint) == 64 and a.fingerprint == again.fingerprint == fingerprint(a.model)
    assert other.fingerprint != a.fingerprint                       # same architecture, other weights
    again.model.config.use_cache = not again.model.config.use_cache  # a field that does not change the function
    assert fingerprint(again.model) == a.fingerprint
    with torch.no_grad():
        next(again.model.parameters())[0, 0] += 1e-3
    assert fingerprint(again.model) != a.fingerprint


def test_bad_model_and_device_are_refused_in_one_line(tmp_path):
    assert resolve_spec(None) == resolve_spec(DEFAULT_MODEL) == DEFAULT_MODEL
    with pytest.raises(InputError, match="no config.json"):
        resolve_spec(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_spec(tmp_path) == str(tmp_path.resolve())
    with pytest.raises(StateError, match="cannot load the model"):
        load_base(str(tmp_path))
    assert check_device("cpu") == torch.device("cpu")
    for bad, needle in [("nonsense", "not a torch device"), ("meta", "only cpu and cuda")]:
        with pytest.raises(InputError, match=needle) as e:
            check_device(bad)
        assert "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            check_device("cuda")
