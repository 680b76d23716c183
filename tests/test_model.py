"""Model loading: sources, 4-bit base, LoRA placement, and the reference policy as adapters-disabled."""

import pytest
import torch

from rl.config import LoraSection, ModelSection
from rl.errors import ModelError
from rl.model import load_base_model, load_policy, random_config

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("shape,billions", [("qwen2.5-0.5b", (0.3, 0.5)), ("qwen2.5-1.5b", (1.3, 1.5)),
                                            ("qwen2.5-7b", (6.7, 7.4)), ("llama-3.1-8b", (7.2, 7.6))])
def test_real_shapes_have_their_size(shape, billions):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config(shape))
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < n < billions[1], n  # the real models' counts less the vocabulary cut to 49,152


def test_lora_on_every_projection_of_a_4bit_base():
    policy = load_policy(ModelSection(name="random:tiny-qwen2", load_in_4bit=True), LoraSection(r=4))
    lora_targets = {name.split(".")[-1] for name, m in policy.model.named_modules() if hasattr(m, "lora_A")}
    assert lora_targets == PROJECTIONS
    layer = policy.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.nested  # NF4, double-quantized
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)


def test_reference_policy_is_the_same_model_with_adapters_disabled():
    policy = load_policy(ModelSection(name="random:tiny"), LoraSection(r=4), seed=3)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    base, _ = load_base_model(ModelSection(name="random:tiny"), seed=3)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        with policy.model.disable_adapter():
            ref = policy.model(input_ids=ids).logits
        torch.testing.assert_close(ref, base(input_ids=ids).logits)
        assert not torch.allclose(policy.model(input_ids=ids).logits, ref)


def test_packaged_smollm2_loads_offline():
    model, tok = load_base_model(ModelSection(name="smollm2-135m-instruct"))
    assert model.config.model_type == "llama" and len(tok) == 49152 and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert len(ids["input_ids"] if hasattr(ids, "keys") else ids) > 3


@pytest.mark.parametrize("name,message", [
    ("/no/such/dir", "does not exist"),
    ("./missing/model.gguf", "GGUF file not found"),
    ("random:qwen9", "unknown random shape"),
])
def test_bad_model_names(name, message):
    with pytest.raises(ModelError, match=message):
        load_base_model(ModelSection(name=name))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="without config.json"):
        load_base_model(ModelSection(name=str(tmp_path)))
