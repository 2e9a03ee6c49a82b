"""Training tensors from token ids: [prompt, left-padded | completion, right-padded] batches.

Masks come from the lengths of what was sampled, never from pad ids, so a pad token equal to the end-of-turn
token (as in SmolLM2) cannot hide a sampled end-of-turn token from the loss. `update_sizes`: how the trained
batch splits into optimizer steps (`--mini_batch_size`, the same option in both training scripts).
"""

import math

import torch



def collate(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device,
            turn_ids: list[list[int]] | None = None) -> dict:
    """[prompt, left-padded | completion, right-padded] batch; masks come from lengths, never from pad ids.
    turn_ids (multi-turn): per completion token, the index of the trained turn it belongs to, -1 if untrained."""
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    N = len(prompt_ids)
    input_ids = torch.full((N, P + C), pad_id, dtype=torch.long)  # (N, P+C)
    attention_mask = torch.zeros(N, P + C, dtype=torch.long)  # (N, P+C)
    turns = torch.full((N, C), -1, dtype=torch.long)  # (N, C)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p) : P + len(c)] = 1
        if turn_ids is not None:
            assert len(turn_ids[i]) == len(c), "one turn index per completion token"
            turns[i, : len(c)] = torch.tensor(turn_ids[i], dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P+C): left padding shifts positions
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 completion_ids=input_ids[:, P:], completion_mask=attention_mask[:, P:].float())  # (N, C)
    if turn_ids is not None:
        batch["turn_ids"] = turns
    return {k: v.to(device) for k, v in batch.items()}


def select(batch: dict, idx: torch.Tensor) -> dict:
    """Rows idx of a collated batch, with columns that are padding in every selected row cut off."""
    sub = {k: v[idx] for k, v in batch.items()}
    C = sub["completion_ids"].shape[1]
    P = sub["input_ids"].shape[1] - C
    used = sub["attention_mask"].bool()
    first = int(used[:, :P].any(0).long().argmax()) if P > 0 else 0
    last_c = max(1, int(sub["completion_mask"].sum(-1).max()))
    # prompt + completion tensors lose leading and trailing padding; other 2-D tensors are per completion token
    # (N, C); 1-D tensors are per sequence (N,)
    full = ("input_ids", "attention_mask", "position_ids")
    return {k: v[:, first : P + last_c] if k in full else v[:, :last_c] if v.dim() == 2 else v for k, v in sub.items()}


def update_sizes(num_sequences: int, args, world: int) -> tuple[int, int]:
    """(sequences per optimizer step on each process, optimizer steps per PPO epoch) for an update on num_sequences
    sequences over all processes: --mini_batch_size per step, or all of them in one step. Called on the batch that
    is actually trained, so a fork that trains a larger batch gets more steps and a recomputed pi_old, not a silent
    ratio of 1."""
    mini_batch = args.mini_batch_size or num_sequences
    return mini_batch // world, math.ceil(num_sequences / mini_batch)
