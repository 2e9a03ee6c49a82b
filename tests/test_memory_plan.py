"""utils/memory_plan.py: its parts by hand, every paper preset against 8 x 80 GiB, the levers where a preset does not
fit, and its formulas against memory measured on CPU.

How the CPU measurement works: a real micro-batch of a small Llama goes through the trainer's code
(`utils.logprobs.completion_logprobs` under the trainer's bf16 autocast, then the backward) inside a
TorchDispatchMode that records every tensor storage an operation creates and drops it once the storage is freed
(weak references), so its running sum is the bytes alive, and its maximum the peak. The weights existed before and
are not counted: what is measured is what the plan's update adds to them (activations, the layer in flight, logits,
log-prob chunks, gradients)."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from utils import memory_plan as mp
from utils.presets import multi_turn, single_turn

GIB = 2**30


def test_parts_by_hand():
    """P = 1000 on 2 GPUs, two full agents with a reference: weights 2 x 4 x 1000 / 2, reference 4 x 1000 / 2, AdamW
    2 x 8 x 1000 / 2, gradients 4 x 1000 / 2; FSDP2 gathers 3 layers of 100 and an untied embedding and head of
    10 x 4 (4 bytes each); b 2 x T 8 x h 4: checkpointed inputs 2 layers x 2 x 8 x 4 x 4 bytes, one layer
    2 x 8 x (24 x 4 + 10 x 16); logits 2 x 2 x (C 3 + 1) x 10 x 2 bytes, chunks 3 x 4 x 10 x 4 bytes."""
    shape = mp.Shape(params=1000, layer_params=100, layers=2, hidden=4, intermediate=16, vocab=10, tied=False, kv_dim=2,
                     lora_params=0)
    s = mp.Setting(full_models=2, agents=2, lora=False, reference=True, micro_batch=2, tokens=8, completion=3,
                   checkpointing=True, vllm_share=0.25, vllm_sleeps=True, generation_batch=1)
    got = {p.name: p.bytes for p in mp.parts(shape, s, gpus=2, gpu_gib=1.0, sharded=True)}
    assert got == {"weights": 4000, "reference": 2000, "optimizer": 8000, "gradients": 2000,
                   "gathered": 4 * (300 + 80), "activations": 2 * 2 * 8 * 4 * 4, "layer": 2 * 8 * (24 * 4 + 10 * 16),
                   "logits": 2 * 2 * 4 * 10 * 2 + 3 * 40 * 4, "vllm": 0.25 * GIB, "cuda": 2 * GIB}
    totals = mp.phase_totals(mp.parts(shape, s, gpus=2, gpu_gib=1.0, sharded=True))
    assert totals["rollout"] == 4000 + 2000 + 8000 + 0.25 * GIB + 2 * GIB  # vLLM awake, no update parts
    # the update: the larger of the forward (activations + layer + logits) and the backward (gradients + layer)
    forward = 512 + 4096 + 640 + 480
    assert totals["update"] == 4000 + 2000 + 8000 + 1520 + 2 * GIB + max(forward, 2000 + 4096)


def paper_presets():
    return [("single", name) for name in single_turn() if name != "cpu"] + \
           [("multiturn", name) for name in multi_turn() if name != "cpu"]


@pytest.mark.parametrize("script,preset", paper_presets())
def test_every_paper_preset_fits_8_gpus_of_80_gib(script, preset):
    text, fits = mp.report(mp.load_args(script, preset), script, gpus=8, gpu_gib=80)
    assert fits, text
    assert "fits: peak" in text and "| optimizer |" in text


def test_a_preset_that_does_not_fit_says_which_settings_bring_it_in():
    text, fits = mp.report(mp.load_args("single", "paper-qwen2.5-7b"), "single", gpus=1, gpu_gib=80)
    assert not fits and "does not fit" in text
    levers = [line for line in text.splitlines() if line.startswith("- `")]
    assert any("--param_mode lora" in line and "(fits)" in line for line in levers), text
    assert any("offload" in line and "(fits)" in line for line in levers), text
    assert all("cost:" in line for line in levers)
    # sixteen GPUs over two nodes halve every sharded part
    sixteen = mp.parts(mp.model_shape(mp.model_config("Qwen/Qwen2.5-7B-Instruct")), mp.setting_of(
        mp.load_args("single", "paper-qwen2.5-7b"), "single"), gpus=16, gpu_gib=80, sharded=True)
    eight = mp.parts(mp.model_shape(mp.model_config("Qwen/Qwen2.5-7B-Instruct")), mp.setting_of(
        mp.load_args("single", "paper-qwen2.5-7b"), "single"), gpus=8, gpu_gib=80, sharded=True)
    for a, b in zip(sixteen, eight):
        if a.name in ("weights", "reference", "optimizer", "gradients"):
            assert a.bytes * 2 == b.bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive; `peak`, their maximum."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self.live.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@pytest.mark.parametrize("h,I,L,V,b,P,C,checkpointing", [
    (256, 1024, 4, 8192, 2, 64, 192, True),  # gradients dominate: the backward's peak
    (256, 1024, 4, 8192, 2, 64, 192, False),
    (512, 2048, 6, 4096, 2, 64, 448, True),
    (512, 2048, 6, 4096, 2, 64, 448, False),
    (128, 512, 4, 4096, 4, 128, 896, True),  # long sequences: the forward's activations and logits dominate
])
def test_formulas_within_25_percent_of_memory_measured_on_cpu(h, I, L, V, b, P, C, checkpointing):
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.batch import collate
    from utils.logprobs import completion_logprobs
    from utils.models import training_autocast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if checkpointing:  # as utils.models.load_model sets it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    batch = collate([[1] * P] * b, [[2] * C] * b, 0, torch.device("cpu"))
    with LiveBytes() as mode:
        logp, _ = completion_logprobs(model, batch, 1.0, training_autocast(torch.device("cpu"), True))
        logp.sum().backward()
    s = mp.Setting(full_models=1, agents=1, lora=False, reference=False, micro_batch=b, tokens=P + C, completion=C,
                   checkpointing=checkpointing, vllm_share=None, vllm_sleeps=True, generation_batch=1)
    plan = mp.parts(mp.model_shape(config), s, gpus=1, gpu_gib=80, sharded=False)
    size = {p.name: p.bytes for p in plan}
    planned = max(size["activations"] + size["layer"] + size["logits"], size["gradients"] + size["layer"])
    print(f"measured {mode.peak / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB")
    assert 0.75 <= planned / mode.peak <= 1.25, (planned / 2**20, mode.peak / 2**20)


def test_gpu_check_dry_runs_every_part_on_cpu(tmp_path):
    """bench/gpu_check.sh --dry: every part (8 training runs, the tests, the step benchmark) ends with status 0 and
    the report compares each run with its memory plan (no CUDA here: the measured column is empty)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    parts = [f"{launch}-{run}" for launch in ("plain", "fsdp") for run in ("rema_full", "rema_lora", "vrp", "multiturn")]
    assert [line.split()[0] for line in summary] == parts + ["tests", "step_benchmark", "report"]
    assert all(" status 0 " in line for line in summary), summary
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| plain-", "| fsdp-"))]
    assert sorted(row.split()[1] for row in rows) == sorted(parts)
    assert all(row.count(" - / ") == 2 for row in rows), rows  # the plan's GiB beside an empty measurement
    assert "passed" in report and '"runs"' in (out / "step_benchmark.json").read_text()
