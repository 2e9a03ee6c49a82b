"""Sampling for the training loops, behind one call: `completions, texts = sampler(agent, prompt_ids, T, desc, keys)`.

What the call hides (plumbing, not the algorithm):
- the backend: HF `generate` on the agent's own model (its LoRA adapter switched on), or the colocated vLLM engine,
  which is first made to hold the agent's current weights (`utils/vllm_engine.py`);
- seeded sampling: every prompt samples from its own random stream, seeded by its key alone (e.g. ("rollout", step,
  question, sample)), so a sample does not depend on its batch or process, and a resumed run draws it again;
- sharded weights (FSDP2): every process must run the same forward passes, so short shares are padded;
- SIGTERM: generation stops between batches, and `Preempted` is raised on every process together;
- the time spent per phase (`sampler.times`, logged as time/<phase>).

With vLLM, two calls frame each update (`metrics |= sampler.before_update(...)`, `metrics |= sampler.after_update(...)`):
the sampler-vs-trainer log-prob gap and the engine's sleep before, the weight push and its checks after. And the
engine's samples come from a slightly different policy than the trainer's pi_old (bf16 kernels; measured 0.035
nats per token for SmolLM2 on CPU), so `importance_weights` gives the off-policy correction that TRL and verl apply:
truncated importance sampling per token, or a sequence-level weight with a cap (masked above it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from utils.distributed import weights_are_sharded
from utils.faults import Preemption
from utils.generation import Completion, generate, sample_seed
from utils.models import Agent
from utils.vllm_engine import VLLMEngine, policy_weights, probe_gap, trainer_logprobs


class Sampler:
    def __init__(self, *, accelerator, tokenizer, stop_ids: list[int], seed: int, top_p: float, top_k: int,
                 batch_size: int, bf16: bool, preemption: Preemption, engine: VLLMEngine | None = None,
                 probe_ids: list[int] | None = None, check: bool = True, stop_strings: tuple[str, ...] = ()):
        self.accelerator, self.tokenizer, self.stop_ids, self.seed = accelerator, tokenizer, stop_ids, seed
        self.top_p, self.top_k, self.batch_size, self.stop_strings = top_p, top_k, batch_size, stop_strings
        self.dtype = torch.bfloat16 if bf16 else None
        self.preemption, self.engine, self.probe_ids, self.check = preemption, engine, probe_ids, check
        self.sharded = weights_are_sharded(accelerator)  # generation must run in lock-step on every process
        self.version: dict[str, int] = defaultdict(int)  # optimizer steps taken by each agent: its weights' version
        self.probe_start: dict[str, list[float]] = {}  # vLLM: the trainer's probe log-probs before an agent's update
        self.times: dict[str, float] = defaultdict(float)  # seconds per phase of the current step

    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.times[phase] += time.perf_counter() - t0

    def policy(self, agent: Agent):
        """What samples for `agent`: its own model, or the vLLM engine holding the agent's current weights."""
        if self.engine is None:
            return agent.activate()
        self.engine.hold(agent.name, self.version[agent.name], lambda: policy_weights(agent.activate(), agent.adapter))
        return self.engine

    def __call__(self, agent: Agent, prompt_ids: list[list[int]], temperature: float, desc: str,
                 keys: list[tuple] | None = None) -> tuple[list[Completion], list[str]]:
        """Completions (ids, truncated flag, vLLM's log-probs) and their decoded text. Sampling (temperature > 0)
        needs one key per prompt, which seeds that prompt's random stream; greedy decoding needs none."""
        assert temperature == 0 or (keys is not None and len(keys) == len(prompt_ids)), "sampling needs a key per prompt"
        seeds = [sample_seed(self.seed, *k) for k in keys] if temperature > 0 else None
        n = len(prompt_ids)
        if self.sharded:  # every process runs the same number of forward passes: pad with copies of a prompt
            most = int(self.accelerator.reduce(torch.tensor(n, device=self.accelerator.device), reduction="max"))
            filler = prompt_ids[0] if prompt_ids else self.tokenizer("Hi", add_special_tokens=False)["input_ids"]
            prompt_ids = prompt_ids + [filler] * (most - n)
            seeds = seeds + [0] * (most - n) if seeds is not None else None
        completions = []
        if prompt_ids:
            with self.timed("weight_sync"):
                policy = self.policy(agent)
            stop = (lambda: self.preemption.requested(self.accelerator)) if self.sharded else self.preemption.local
            with self.timed("generate"):
                completions = generate(policy, self.tokenizer, prompt_ids, max_new_tokens=agent.max_completion_length,
                                       temperature=temperature, top_p=self.top_p, top_k=self.top_k,
                                       stop_ids=self.stop_ids, stop_strings=self.stop_strings,
                                       batch_size=self.batch_size, autocast_dtype=self.dtype, desc=desc,
                                       show_progress=self.accelerator.is_main_process, synced_gpus=self.sharded,
                                       seeds=seeds, should_stop=stop)
        self.preemption.check(self.accelerator)  # SIGTERM on any process: every process stops here
        completions = completions[:n]
        return completions, [self.tokenizer.decode(c.ids, skip_special_tokens=True).strip() for c in completions]

    # ---- vLLM: around each update ----
    def before_update(self, agent: Agent, old_logp: torch.Tensor, sampler_logp: torch.Tensor | None,
                      mask: torch.Tensor) -> dict:
        """vLLM: the mean |log p_sampler - log p_trainer| over the trained tokens (mask: (N, C)), then the engine
        sleeps through the update. With HF generation: nothing."""
        if self.engine is None:
            return {}
        metrics = {}
        if sampler_logp is not None:
            gap = torch.stack([((old_logp - sampler_logp).abs() * mask).sum(), mask.sum()])
            gap_sum, tokens = self.accelerator.reduce(gap, reduction="sum").tolist()
            metrics["vllm/sampler_logprob_gap"] = gap_sum / max(tokens, 1.0)
        if self.check and agent.name not in self.probe_start:
            self.probe_start[agent.name] = trainer_logprobs(agent.activate(), self.probe_ids)
        self.engine.sleep()  # the update phase needs the memory (where vLLM supports sleeping)
        return metrics

    def after_update(self, agent: Agent) -> dict:
        """The agent's weights moved one version: push them into the engine now, and check that it follows them."""
        self.version[agent.name] += 1
        if self.engine is None:
            return {}
        model = agent.activate()
        with self.timed("weight_sync"):
            self.engine.hold(agent.name, self.version[agent.name], lambda: policy_weights(model, agent.adapter))
        if not self.check:
            return {}
        gap, probe = probe_gap(self.engine, model, self.probe_ids)
        drift = sum(abs(a - b) for a, b in zip(probe, self.probe_start[agent.name])) / len(probe)
        device = self.accelerator.device
        gap, drift = self.accelerator.reduce(torch.tensor([gap, drift], device=device), reduction="mean").tolist()
        weights = self.engine.weight_gap(lambda: policy_weights(model, agent.adapter))  # 0.0 when in sync
        weights = self.accelerator.reduce(torch.tensor(weights, device=device), reduction="max").item()
        return {"vllm/probe_logprob_gap": gap, "vllm/probe_logprob_drift": drift, "vllm/weight_gap": weights}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # before the process group goes away


def make_sampler(args, accelerator, path: str, tokenizer, preemption: Preemption, max_model_len: int | None,
                 stop_strings: tuple[str, ...] = ()) -> Sampler:
    """The Sampler a training script's options describe (args.generation, args.vllm), with its vLLM engine if asked."""
    from utils import prompts
    from utils.models import end_of_turn_ids

    engine, probe_ids, gen = None, None, args.generation
    if gen.backend == "vllm":  # one engine per process; it holds the weights of the agent it generates for
        engine = VLLMEngine(path, max_model_len=max_model_len, memory_utilization=args.vllm.memory_utilization,
                            seed=args.run.seed + accelerator.process_index, sleep=args.vllm.sleep,
                            distributed=accelerator.num_processes > 1)
        probe_ids = prompts.render(tokenizer, prompts.vrp_messages("What is 12 + 30?")) + tokenizer(
            "12 + 30 = 42, so the answer is \\boxed{42}.", add_special_tokens=False)["input_ids"]
    return Sampler(accelerator=accelerator, tokenizer=tokenizer, stop_ids=end_of_turn_ids(tokenizer), seed=args.run.seed,
                   top_p=gen.top_p, top_k=gen.top_k, batch_size=gen.generation_batch_size, bf16=args.lm.bf16,
                   preemption=preemption, engine=engine, probe_ids=probe_ids, check=args.vllm.check,
                   stop_strings=stop_strings)


def sampler_logprobs(completions: list[Completion], mask: torch.Tensor) -> torch.Tensor | None:
    """vLLM's log-probs of the sampled tokens as an (N, C) tensor aligned with the trainer's (None with HF)."""
    if any(c.logprobs is None for c in completions):
        return None
    sampled = torch.zeros_like(mask)
    for i, c in enumerate(completions):
        sampled[i, : len(c.logprobs)] = torch.tensor(c.logprobs, device=mask.device)
    return sampled


def importance_weights(old_logp, sampler_logp, mask, mode: str, cap: float):
    """Truncated / masked importance sampling for samples drawn by another policy (vLLM's): w = pi_old / pi_sampler,
    per token, or per sequence (the product over its tokens); *_truncate: min(w, cap); *_mask: 0 where w > cap.
    (N, C) inputs; returns the weights (N, C) and sums for the metrics (mean weight, share over the cap)."""
    log_w, units = (old_logp - sampler_logp) * mask, mask  # (N, C); a weight per token
    if mode.startswith("sequence"):  # a weight per sequence: (N, 1)
        log_w, units = log_w.sum(-1, keepdim=True), (mask.sum(-1, keepdim=True) > 0).float()
    w = torch.exp(log_w)
    over = (w > cap).float() * units
    w = w.clamp(max=cap) if mode.endswith("truncate") else w.masked_fill(over > 0, 0.0)
    stats = {"is_weight": (w * units).sum().item(), "is_over_cap": over.sum().item(), "is_units": units.sum().item()}
    return w.expand_as(mask) * mask, stats


