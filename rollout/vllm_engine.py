"""The vLLM rollout engine: vLLM in the trainer's process, generating with the policy's own base weights.

    engine = VLLMEngine(policy_model, tokenizer, model_dir, lora_rank=16)
    outs = engine.generate(prompt_token_ids, SamplingParams(max_tokens=64, n=8, seed=0))

- In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): no second process, no second copy of anything.
- Shared base: vLLM loads the model once; then each frozen base parameter of the policy (embeddings, norms,
  projections; q/k/v and gate/up cut out of vLLM's fused matrices by their output sizes) is replaced by a
  view of vLLM's tensor. The base exists once in memory (`engine.shared` lists what was shared).
  On CPU, vLLM 0.32 would repack each linear weight into a oneDNN handle and empty the parameter; the
  models registered here (`Tandem<Arch>`, through vLLM's ModelRegistry) mark their linear layers with the
  flag vLLM's CPU path honours to keep plain weights instead (`_cpu_skip_gemm_dispatch`).
- LoRA: vLLM serves one adapter (id 1), registered once from a PEFT directory written at start-up; before
  each rollout the live adapter tensors are copied in place into vLLM's copy of it and, once it is active,
  into vLLM's LoRA slot (`set_lora`): no disk round trip per step. `timing/lora_sync` is logged.
- Sampling logprobs are vLLM's processed logprobs (after temperature / top-k / top-p), as the native
  engine returns, for the importance-sampling correction.
- On CUDA, vLLM pauses between rollouts and releases its KV cache's memory (weights stay: they are the
  policy's).
- A 4-bit (QLoRA) policy: vLLM loads the base with bitsandbytes NF4 (built in up to 0.27, the
  vllm-bnb-plugin package from 0.28), packing q/k/v and gate/up shard by shard into one uint8 tensor with a
  QuantState per shard; each of the policy's NF4 weights becomes a view of its shard and takes that shard's
  QuantState (vLLM's scales are not double-quantized; the policy keeps its compute dtype). Training runs
  through those tensors. Without bitsandbytes in vLLM such policies are refused, and `rollout.engine: auto`
  gives 4-bit policies the native engine until the two are measured against each other.

Every reach into vLLM's internals (the worker's model and LoRA manager, model registration, the KV cache
between rollouts) goes through rollout/vllm_compat.py, which names the differences between the tested
releases (0.26 on CUDA, 0.32 on the CPU). `rollout.engine: auto` uses vLLM only inside that range; `vllm`
runs another release with a warning.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time

import torch

from rollout import vllm_compat as compat
from rollout.engine import Completion, SamplingParams
from rollout.vllm_compat import installed_version

log = logging.getLogger("tandem")

LORA_ID = 1
FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "MistralForCausalLM": "mistral"}


def unsupported_reason() -> str | None:
    """None when a vLLM is installed that the engine can try; else why it cannot be used."""
    return compat.version_status(installed_version())[0]


class VLLMEngine:
    def __init__(self, model, tokenizer, model_dir: str, lora_rank: int, max_model_len: int = 2048,
                 kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 share_weights: bool = True, enforce_eager: bool | None = None, max_batch: int | None = None):
        """enforce_eager: no torch.compile or CUDA graphs in vLLM (a start in seconds, slower decoding);
        None = on the CPU only. max_batch: the most sequences a rollout decodes at once; on CUDA, vLLM captures
        its graphs up to that batch only (a shorter start-up), None = vLLM's defaults."""
        reason, warning = compat.version_status(installed_version())
        if reason is not None:
            raise RuntimeError(f"{reason}; {compat.INSTALL}, or use rollout.engine native")
        if warning is not None:
            log.warning(warning)
        self.model = model
        self.tokenizer = tokenizer
        self.lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        arch = (self.lm.config.architectures or [type(self.lm).__name__])[0]
        if arch not in FAMILIES:
            raise RuntimeError(f"the vLLM engine shares weights with {', '.join(FAMILIES)} models; "
                               f"this one is {arch}: use rollout.engine native")
        self.four_bit = any(getattr(p, "quant_state", None) is not None for p in self.lm.parameters())
        if self.four_bit and not (share_weights and compat.has_bitsandbytes(installed_version())):
            why = ("rollout.vllm_share_weights is false (vLLM would hold a second copy)" if not share_weights else
                   f"vLLM {installed_version()} has no bitsandbytes (NF4) support to share it with (built in up to "
                   "0.27; from 0.28: pip install --no-deps vllm-bnb-plugin==0.0.3)")
            raise RuntimeError(f"the policy's base is 4-bit, and {why}; use rollout.engine native (it reads the "
                               "4-bit layers), or model.load_in_4bit false to share a 16-bit base with vLLM")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vLLM in this process: one copy of the weights
        threads = torch.get_num_threads()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # else vLLM drops the trainer to one thread
        from vllm import LLM

        compat.register_shared_models()
        self._adapter_dir = tempfile.TemporaryDirectory(prefix="tandem-vllm-lora-")
        model.save_pretrained(self._adapter_dir.name)  # once: registers the adapter's shape with vLLM
        dtype = str(self.lm.dtype).split(".")[-1]
        if self.four_bit:
            # vLLM quantizes the base as it loads it (NF4, blocks of 64, as the policy's), and the policy's 4-bit
            # tensors then become views of vLLM's. Its bitsandbytes loader on the CPU needs a 16-bit dtype (in
            # fp32 it stops on a shape check); the policy's own compute dtype does not change.
            dtype = "bfloat16" if dtype == "float32" else dtype
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
                      enable_lora=True, max_lora_rank=max(8, lora_rank), max_loras=1, max_model_len=max_model_len,
                      seed=seed, logprobs_mode="processed_logprobs", enable_prefix_caching=False)
        if share_weights:  # the registered subclass keeps plain weights; else vLLM packs its own copy
            kwargs["hf_overrides"] = {"architectures": [f"Tandem{arch}"]}
        if self.four_bit:
            kwargs["quantization"] = "bitsandbytes"
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
        kwargs["enforce_eager"] = not torch.cuda.is_available() if enforce_eager is None else enforce_eager
        if torch.cuda.is_available() and not kwargs["enforce_eager"] and max_batch:
            kwargs.update(compat.cuda_graph_options(max_batch))
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 (what vLLM's start-up raises varies by release; the message is kept)
            raise RuntimeError(f"vLLM {installed_version()} could not load {model_dir} "
                               f"({type(e).__name__}: {_first_line(e)})") from None
        torch.set_num_threads(threads)
        try:
            compat.require_internals(self.llm)
        except RuntimeError:
            self.close()
            raise
        self._check_generates()
        log.info("vLLM %s loaded %s in %.1f s%s", installed_version(), model_dir, time.perf_counter() - t0,
                 f" (CUDA graphs for batches of {compat.captured_batch_sizes(self.llm)})"
                 if "compilation_config" in kwargs else "")
        self.vllm_model = compat.vllm_model(self.llm)
        rss = _rss_bytes()
        self.shared = self._share_base_weights() if share_weights else []
        _release_freed_memory()  # the policy's own copies of the shared tensors go now
        self.bytes_freed_by_sharing = rss - _rss_bytes()
        log.info("vLLM engine: %d base tensors of the policy are views of vLLM's; process memory %+.0f MB",
                 len(self.shared), -self.bytes_freed_by_sharing / 1e6)
        from vllm.lora.request import LoRARequest

        self.lora_request = LoRARequest("tandem", LORA_ID, self._adapter_dir.name)
        self.last_sync_s = 0.0

    def _check_generates(self) -> None:
        """One token from a one-token prompt: a model vLLM loads but cannot run (a head size its attention
        kernels lack, say) fails here, at start-up, where `auto` can still choose the native engine."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])], VLLMSamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as e:  # noqa: BLE001 (vLLM's kernels raise what they raise; the message is kept)
            self.close()  # its KV cache and weights go now, not at exit: `auto` goes on with the native engine
            self.llm = None
            _release_freed_memory()
            raise RuntimeError(f"vLLM {installed_version()} loaded the model but could not generate with it "
                               f"({type(e).__name__}: {_first_line(e)})") from None

    # ------------------------------------------------------------------ weights

    def _vllm_params(self) -> dict[str, torch.Tensor]:
        return {name.replace(".base_layer.", "."): p for name, p in self.vllm_model.named_parameters()}

    def _share_base_weights(self) -> list[str]:
        """Replace the policy's frozen base parameters by views of vLLM's tensors; -> the names shared."""
        theirs = self._vllm_params()
        packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                  "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        shared = []
        for name, module in self.lm.named_modules():
            base = getattr(module, "base_layer", None)
            target = base if base is not None else module
            for pname in ("weight", "bias"):
                p = target._parameters.get(pname) if hasattr(target, "_parameters") else None
                if p is None or p.requires_grad or ".lora_" in name:
                    continue
                if getattr(p, "quant_state", None) is not None:
                    if self._share_4bit(theirs, name, packed, target, p):
                        shared.append(f"{name}.{pname}")
                    continue
                view = self._vllm_view(theirs, name, pname, packed, p)
                if view is None:
                    continue
                target._parameters[pname] = torch.nn.Parameter(view, requires_grad=False)
                shared.append(f"{name}.{pname}")
        if self.lm.config.tie_word_embeddings:  # the head is the embedding: tie it again to the shared one
            self.lm.lm_head.weight = self.lm.model.embed_tokens.weight
        return shared

    def _vllm_view(self, theirs, name: str, pname: str, packed, mine: torch.Tensor) -> torch.Tensor | None:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in packed:
            fused, index = packed[leaf]
            full = theirs.get(f"{name.rsplit('.', 1)[0]}.{fused}.{pname}")
            if full is None:
                return None
            fused_module = self._vllm_module(f"{name.rsplit('.', 1)[0]}.{fused}")
            sizes = list(fused_module.output_sizes) if hasattr(fused_module, "output_sizes") else None
            if sizes is None:
                return None
            start = sum(sizes[:index])
            view = full[start:start + sizes[index]]
        else:
            view = theirs.get(f"{name}.{pname}")
            if view is None:
                return None
            view = view[:mine.shape[0]] if view.dim() >= 1 and view.shape[1:] == mine.shape[1:] else view
        if view.shape != mine.shape or view.dtype != mine.dtype:
            return None
        return view

    def _share_4bit(self, theirs, name: str, packed, module, p) -> bool:
        """Point the policy's NF4 weight `p` at its shard of vLLM's packed tensor, with vLLM's quantization
        state for it (vLLM packs q/k/v and gate/up into one uint8 tensor, shard by shard, and keeps one
        bitsandbytes QuantState per shard). -> whether it was shared."""
        from bitsandbytes.functional import QuantState

        leaf, prefix = name.rsplit(".", 1)[-1], name.rsplit(".", 1)[0]
        fused, index = packed.get(leaf, (leaf, 0))
        full = theirs.get(f"{prefix}.{fused}.weight")
        states = getattr(full, "bnb_quant_state", None)
        if full is None or not states or index not in states:
            return False
        offsets = getattr(full, "bnb_shard_offsets", None)
        start, end = (int(offsets[index]), int(offsets[index + 1])) if offsets is not None else (0, full.shape[0])
        view, state, mine = full.data[start:end], states[index], p.quant_state
        if view.shape != p.shape or view.dtype != p.dtype or tuple(state.shape) != tuple(mine.shape) \
                or state.blocksize != mine.blocksize or state.quant_type != mine.quant_type:
            return False
        p.data = view
        # vLLM's scales (not double-quantized) with the policy's compute dtype
        p.quant_state = QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                                   quant_type=state.quant_type, dtype=mine.dtype, offset=state.offset,
                                   state2=state.state2)
        # bitsandbytes repacks a Linear4bit's weight into a new CPU layout on its first no-grad forward where the
        # CPU has AVX512-BF16, which would end the sharing there: keep the layout both read
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        return True

    def _vllm_module(self, name: str):
        module = self.vllm_model.get_submodule(name)
        return getattr(module, "base_layer", module)

    # ------------------------------------------------------------------ LoRA

    def _manager(self):
        return compat.lora_manager(self.llm)

    def sync_lora(self) -> float:
        """The live adapter into vLLM's copy of it (and its active slot): -> seconds taken."""
        t0 = time.perf_counter()
        manager = self._manager()
        lora_model = manager._registered_adapters.get(LORA_ID)
        if lora_model is None:  # not loaded yet: the first generate loads it from the directory written
            self.model.save_pretrained(self._adapter_dir.name)
            self.last_sync_s = time.perf_counter() - t0
            return self.last_sync_s
        slot = manager.lora_index_to_id.index(LORA_ID) if LORA_ID in manager.lora_index_to_id else None
        mine = dict(self.lm.named_modules())
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        with torch.inference_mode():  # vLLM made its adapter tensors under inference mode
            for name, weights in lora_model.loras.items():
                prefix, leaf = name.rsplit(".", 1)
                sources = [mine[f"{prefix}.{p}"] for p in parts.get(leaf, (leaf,))]
                a, b = _live_lora(sources)
                if isinstance(weights.lora_a, list):
                    for dst, src in zip(weights.lora_a, a):
                        dst.copy_(src)
                    for dst, src in zip(weights.lora_b, b):
                        dst.copy_(src)
                else:
                    weights.lora_a.copy_(a[0])
                    weights.lora_b.copy_(b[0])
                if slot is not None:
                    manager.modules[name].set_lora(slot, weights.lora_a, weights.lora_b)
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
        self._wake()
        self.sync_lora()
        no_stop = params.stop_token_ids is not None and len(params.stop_token_ids) == 0
        # a seed is per request in vLLM: prompt i gets seed + i, so that two equal prompts (a multi-turn
        # rollout's conversations, each its own prompt) are not sampled alike
        sps = [VLLMSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                  top_k=params.top_k if params.top_k > 0 else 0, max_tokens=params.max_tokens,
                                  seed=None if params.seed is None else params.seed + i, logprobs=0,
                                  ignore_eos=no_stop, stop_token_ids=list(params.stop_token_ids or []) or None,
                                  skip_special_tokens=True)
               for i in range(len(prompt_token_ids))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_token_ids], sps,
                                 lora_request=self.lora_request, use_tqdm=False)
        groups = []
        for out in outs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[t].logprob for step, t in zip(c.logprobs or [], ids)]
                group.append(Completion(ids, lps, "stop" if c.finish_reason == "stop" else "length", c.text))
            groups.append(group)
        self._sleep()
        return groups

    def close(self) -> None:
        """Shut vLLM's engine down now. Its own finalizer would run at interpreter exit, after a torchrun
        process group it builds its (size-one) parallel groups on is gone, and fail there."""
        if getattr(self, "llm", None) is not None:
            compat.shutdown(self.llm)

    def _wake(self) -> None:
        if torch.cuda.is_available() and compat.is_paused(self.llm):
            compat.restore_kv_cache(self.llm)  # the KV cache back, scheduling resumed

    def _sleep(self) -> None:
        """On CUDA, give the KV cache's memory back while the trainer runs. Never sleep level 1 or 2: they
        unmap the weights, and the policy's base is those very tensors. vllm_compat pauses scheduling and
        releases only the KV cache's physical memory."""
        if torch.cuda.is_available():
            compat.release_kv_cache(self.llm)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _release_freed_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise, and the process would
    look as if it still held two copies)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _live_lora(sources) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """peft LoRA layers -> (A list, B * scaling list) for the adapter they are running, as vLLM stores them."""
    a, b = [], []
    for m in sources:
        name = m.active_adapters[0]
        a.append(m.lora_A[name].weight)
        b.append(m.lora_B[name].weight * m.scaling[name])
    return a, b
