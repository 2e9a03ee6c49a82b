"""Process-group setup: one Accelerator, with the traps of multi-process runs turned into clear errors.

- Without CUDA, accelerate only forms a process group when asked for the CPU backend (gloo); otherwise each
  process launched by torchrun / `accelerate launch` runs alone, and N copies write the same run directory.
- accelerate 1.15 enables FSDP only for GPU-type backends: on a CPU an FSDP config would silently become plain
  data parallelism. `make_accelerator` makes it take its FSDP2 path on gloo instead (`_fsdp_on_gloo`), so a CPU
  run with `configs/cpu_2proc_fsdp.yaml` goes through the same preparation, clipping and checkpointing code as an
  8-GPU run with `configs/fsdp.yaml` (docs/scaling.md says what differs: NCCL, CUDA memory).
- DeepSpeed is refused: one Accelerator prepares one DeepSpeed model, and ReMA trains two (docs/scaling.md).
"""

import math
import os
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, gather_object


def _wants(backend: str) -> bool:
    """Does the launcher's accelerate config ask for this backend (accelerate passes it as an environment variable)?"""
    return os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true"


@contextmanager
def _fsdp_on_gloo():
    """While an Accelerator is built: where accelerate sets up a CPU process group (MULTI_CPU, gloo) although the
    config asks for FSDP, report FSDP and attach the FSDP plugin accelerate built from the config, exactly as it does
    for GPUs (accelerate 1.15 decides this in `AcceleratorState.__init__`, with no option to ask for it). Everything
    after that (`prepare`, `clip_grad_norm_`, `save_state`, `get_state_dict`) is accelerate's own FSDP2 code."""
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


def make_accelerator(find_unused_parameters: bool) -> Accelerator:
    if _wants("DEEPSPEED"):
        raise SystemExit("DeepSpeed is not supported: one Accelerator prepares one DeepSpeed model, and ReMA trains two "
                         "agents, each with its own optimizer. Shard with FSDP2 instead: accelerate launch "
                         "--config_file configs/fsdp.yaml (docs/scaling.md)")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    cpu = not torch.cuda.is_available()
    with _fsdp_on_gloo() if cpu and _wants("FSDP") else nullcontext():
        accelerator = Accelerator(kwargs_handlers=[ddp], cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SystemExit(f"the launcher started WORLD_SIZE={launched} processes but accelerate sees "
                         f"{accelerator.num_processes}; launch with `accelerate launch --config_file ...`")
    if _wants("FSDP") and not accelerator.is_fsdp2:
        raise SystemExit(f"the accelerate config asks for FSDP, but accelerate runs {accelerator.distributed_type} "
                         "with FSDP version 1 or none; this project supports FSDP2 (fsdp_version: 2, configs/fsdp.yaml)")
    return accelerator


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """FSDP all-gathers weights inside every forward pass: generation must run in lock-step on every process."""
    return accelerator.distributed_type == DistributedType.FSDP


def shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This process's share of items, padded (by repeating its last item) to the same length on every process so
    that every process runs the same number of generation batches; also how many of the items are real."""
    mine = items[rank::world]
    size = math.ceil(len(items) / world)
    return mine + [mine[-1] if mine else items[0]] * (size - len(mine)), len(mine)


def shard_marked(rows: list[dict], rank: int, world: int) -> list[dict]:
    """`shard` for rows that are scored and then gathered: this process's share, each row marked padding=True or
    False, so that every process runs the same collectives and gather_real drops the padding afterwards."""
    mine, n_real = shard(rows, rank, world)
    return [r | {"padding": j >= n_real} for j, r in enumerate(mine)]


def gather_real(values: list, marks: list[dict]) -> list:
    """Collective: the values of every process, in process order, without those whose mark (a row of shard_marked,
    one per value) is padding; dict values lose their padding key."""
    real = [{k: x for k, x in v.items() if k != "padding"} if isinstance(v, dict) else v
            for v, m in zip(values, marks) if not m["padding"]]
    return sum(gather_object([real]), [])


def reduce_sums(accelerator: Accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Collective: every key summed over the processes (every process passes the same keys). A dict in, a dict out."""
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, reduction="sum").tolist()))


def grad_sync(accelerator: Accelerator, model: torch.nn.Module, sync: bool):
    """The context of one micro-batch's backward in gradient accumulation. DDP: skip the all-reduce (`no_sync`) until
    the last micro-batch. FSDP2: reduce-scatter every micro-batch; its `no_sync` would keep the full unsharded
    gradient on every process between micro-batches (2x the sharded gradient on 2 processes, +28 GiB per GPU for a 7B
    agent on 8), which the sharding is there to avoid."""
    if sync or accelerator.distributed_type == DistributedType.FSDP:
        return nullcontext()
    return accelerator.no_sync(model)


def clip_grad_norm(accelerator: Accelerator, params: list, max_norm: float) -> float:
    """Clip the gradient of `params` (one agent's) to `max_norm`; return its norm before clipping, the same on every
    process. Under FSDP accelerate's `clip_grad_norm_` looks for the model that owns the parameters by comparing
    lists of tensors with `==`, which compares two agents of one shape element-wise and fails on DTensors; torch's
    own `clip_grad_norm_` takes the parameters as given and reduces the sharded norms itself."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(norm))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value: a DTensor (FSDP2's sharded parameters, gradients, norms) is gathered
    (collective: every process calls it for the same tensors in the same order); any other tensor is returned as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def peak_memory(accelerator: Accelerator, phase: str) -> dict[str, float]:
    """On CUDA: the peak memory allocated since the last call, in GiB, the largest over the processes, as
    `memory/<phase>_peak_gib` (then the peak restarts); on other devices nothing. Collective on CUDA."""
    if accelerator.device.type != "cuda":
        return {}
    peak = torch.tensor(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, device=accelerator.device)
    torch.cuda.reset_peak_memory_stats(accelerator.device)
    return {f"memory/{phase}_peak_gib": accelerator.reduce(peak, reduction="max").item()}
