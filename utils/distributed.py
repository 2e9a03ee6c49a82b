"""Process-group setup: one Accelerator, with the traps of multi-process runs turned into clear errors.

- Without CUDA, accelerate only forms a process group when asked for the CPU backend (gloo); otherwise each
  process launched by torchrun / `accelerate launch` runs alone, and N copies write the same run directory.
- accelerate enables FSDP only for GPU-type backends: an FSDP (or DeepSpeed) config on CPU silently becomes plain
  data parallelism. Both are refused here rather than run in a way the user did not ask for.
"""

import math
import os

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType


def make_accelerator(find_unused_parameters: bool) -> Accelerator:
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    accelerator = Accelerator(kwargs_handlers=[ddp], cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SystemExit(f"the launcher started WORLD_SIZE={launched} processes but accelerate sees "
                         f"{accelerator.num_processes}; launch with `accelerate launch --config_file ...`")
    for backend, kind in (("FSDP", DistributedType.FSDP), ("DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true" and accelerator.distributed_type != kind:
            raise SystemExit(f"the accelerate config asks for {backend}, but accelerate runs "
                             f"{accelerator.distributed_type} (it does not shard without CUDA devices); refusing to "
                             f"run unsharded. On CPU use configs/cpu_2proc.yaml")
    return accelerator


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """FSDP and ZeRO-3 all-gather weights inside every forward pass: generation must run in lock-step."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This process's share of items, padded (by repeating its last item) to the same length on every process so
    that every process runs the same number of generation batches; also how many of the items are real."""
    mine = items[rank::world]
    size = math.ceil(len(items) / world)
    return mine + [mine[-1] if mine else items[0]] * (size - len(mine)), len(mine)


def reduce_sums(accelerator: Accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Collective: every key summed over the processes (every process passes the same keys). A dict in, a dict out."""
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, reduction="sum").tolist()))


def check_deepspeed(accelerator: Accelerator, two_full_models: bool, micro_batch_size: int, mini_per_rank: int) -> None:
    """DeepSpeed's limits, as clear errors: one Accelerator prepares one DeepSpeed model, and DeepSpeed steps its
    optimizer inside every backward (so there is no gradient accumulation over micro-batches)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if two_full_models:
        raise SystemExit("under DeepSpeed one Accelerator prepares one model; two full models need --param_mode lora "
                         "(one base, two adapters) or an FSDP config (configs/fsdp.yaml)")
    if micro_batch_size < mini_per_rank:
        raise SystemExit(f"DeepSpeed steps its optimizer inside every backward, so gradient accumulation over "
                         f"micro-batches does not apply: set --micro_batch_size {mini_per_rank} (the per-process "
                         "mini-batch) or lower the mini-batch")
