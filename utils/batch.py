"""Training tensors from token ids: [prompt, left-padded | completion, right-padded] batches.

Masks come from the lengths of what was sampled, never from pad ids, so a pad token equal to the end-of-turn
token (as in SmolLM2) cannot hide a sampled end-of-turn token from the loss.
"""

import torch

from utils.generation import Completion


def collate(prompt_ids: list[list[int]], completions: list[Completion], pad_id: int, device) -> dict:
    """[prompt, left-padded | completion, right-padded] batch; masks come from lengths, never from pad ids."""
    P = max(len(p) for p in prompt_ids)
    C = max(len(c.ids) for c in completions)
    N = len(prompt_ids)
    input_ids = torch.full((N, P + C), pad_id, dtype=torch.long)  # (N, P+C)
    attention_mask = torch.zeros(N, P + C, dtype=torch.long)  # (N, P+C)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        input_ids[i, P : P + len(c.ids)] = torch.tensor(c.ids)
        attention_mask[i, P - len(p) : P + len(c.ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P+C): left padding shifts positions
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 completion_ids=input_ids[:, P:], completion_mask=attention_mask[:, P:].float())  # (N, C)
    return {k: v.to(device) for k, v in batch.items()}


def select(batch: dict, idx: torch.Tensor) -> dict:
    """Rows idx of a collated batch, with columns that are padding in every selected row cut off."""
    sub = {k: v[idx] for k, v in batch.items()}
    C = sub["completion_ids"].shape[1]
    P = sub["input_ids"].shape[1] - C
    used = sub["attention_mask"].bool()
    first = int(used[:, :P].any(0).long().argmax()) if P > 0 else 0
    last_c = int(sub["completion_mask"].sum(-1).max())
    # prompt + completion tensors lose leading and trailing padding; every other tensor is per completion token (N, C)
    full = ("input_ids", "attention_mask", "position_ids")
    return {k: v[:, first : P + last_c] if k in full else v[:, :last_c] for k, v in sub.items()}
