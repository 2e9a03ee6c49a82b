"""Run under `accelerate launch --config_file configs/cpu_2proc_fsdp.yaml` by tests/test_fsdp.py: a model and a
LoRA model sharded by accelerate's FSDP2 preparation give, through `policy_weights` (what the vLLM engine is
pushed), the same full plain tensors as unsharded copies of them. Rank 0 writes its findings as JSON to argv[2]."""

import copy
import json
import sys

import torch
from peft import LoraConfig, get_peft_model

from utils.distributed import make_accelerator
from utils.models import load_model
from utils.vllm_engine import policy_weights


def compare(sharded, reference, adapter=None) -> dict:
    ours, theirs = dict(policy_weights(sharded, adapter)), dict(policy_weights(reference, adapter))
    return {"names_equal": sorted(ours) == sorted(theirs),
            "plain": all(type(t) is torch.Tensor for t in ours.values()),
            "shapes_equal": all(ours[n].shape == theirs[n].shape for n in theirs if n in ours),
            "max_diff": max((ours[n] - theirs[n]).abs().max().item() for n in theirs if n in ours)}


def main(model_path: str, out: str) -> None:
    accelerator = make_accelerator(find_unused_parameters=False)
    findings = {"distributed_type": str(accelerator.distributed_type)}
    torch.manual_seed(0)
    full = load_model(model_path)
    reference = copy.deepcopy(full)
    full, _ = accelerator.prepare(full, torch.optim.AdamW(full.parameters()))
    findings["full"] = compare(full, reference)
    lora = get_peft_model(load_model(model_path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                          adapter_name="reasoning")
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero; a non-zero B makes the merged update visible
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    reference = copy.deepcopy(lora)
    params = [p for p in lora.parameters() if p.requires_grad]
    accelerator.prepare(lora.base_model.model, torch.optim.AdamW(params))  # as utils.models.build_agents shards it
    findings["lora"] = compare(lora, reference, "reasoning")
    base, merged = load_model(model_path).state_dict(), dict(policy_weights(reference, "reasoning"))
    findings["lora_delta"] = max((merged[n] - base[n]).abs().max().item() for n in base)
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(findings, f)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
