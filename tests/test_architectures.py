import pytest
import torch
from conftest import TINY_ARCHITECTURES, _tiny_config, registered_architecture_names
from transformers import GPT2Config

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import architecture_for, decoder_layers
from slimllm.models.loading import load_model


def test_registry_has_tiny_fixtures():
    assert sorted(registered_architecture_names()) == sorted(TINY_ARCHITECTURES)


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_registry_entry_matches_config(arch_name):
    config = _tiny_config(arch_name, tied=True)
    arch = architecture_for(config)
    assert arch.name == arch_name
    import gguf

    assert arch.gguf_arch in gguf.MODEL_ARCH_NAMES.values()


def test_unsupported_architecture_is_a_user_error():
    with pytest.raises(UserInputError, match="model type 'gpt2' is not supported"):
        architecture_for(GPT2Config())


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
@pytest.mark.parametrize("tied", [True, False])
def test_load_each_architecture_from_disk(tiny_model_dir, arch_name, tied):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch_name, tied)
    loaded = load_model(str(path), device="cpu")
    assert loaded.architecture.name == arch_name
    assert len(decoder_layers(loaded.model)) == 6
    assert loaded.model.config.tie_word_embeddings == tied
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[5, 17, 300, 4000, 12]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)
