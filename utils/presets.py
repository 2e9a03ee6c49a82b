"""The paper's configurations as named presets: `--preset NAME` replaces a script's defaults (its CPU preset, `cpu`)
with these values, and every flag given with it still overrides one. Dotted keys reach into an option group.

Single-turn (Sec. 3.2.1, App. D.1): OpenRLHF REINFORCE++ with KL 1e-2 in the reward, Adam lr 5e-7, rollouts of 1000
prompts x 4 samples at temperature 1, 2048 new tokens, clip 0.2, prompt filter 0.2 / 0.8 from 10 samples over the
whole train set (MATH's 7.5k train problems, Sec. 4.1), 4 plans per kept question, #UpdateIteration rounds of
#TrainingEpisode epochs per agent. The filter is ReMA's (App. D.1): the VRP_RL / MRP_RL baselines train on the whole
train set for #TrainingEpisode epochs. The paper's mini-batch of 500 sequences does not split over 8 processes; 400
(10 optimizer steps per rollout) does.
Multi-turn (Sec. 4.3, App. D.2): Qwen2.5-7B after SFT on the multi-turn conversations (sft.py), GRPO over 128
questions x 16 trajectories, 30 turns of 512 tokens in a 4096-token context, stop on truncation, the [FINISH]
reward mask, AdamW lr 1e-6, weight decay 0.01, 4 mini-batches, 500 steps.
"""

MATH500 = {"data.eval_dataset": "../shared/data/math_benchmarks.jsonl", "data.eval_limit": 500}  # its first 500 rows
MATH = MATH500 | {"data.train_dataset": "hendrycks_math", "data.train_split": "train"}  # Sec. 4.1: MATH's 7.5k train set
MATH_LV3TO5 = MATH500 | {"data.train_dataset": "../shared/data/math_train_lv3to5.jsonl"}  # levels 3-5 (8523): multi-turn
JUDGE = {"data.task": "judge", "data.train_dataset": "allenai/reward-bench",  # split here: 5000 / 970
         "data.eval_dataset": "allenai/reward-bench", "data.eval_limit": None}  # RewardBench970
SINGLE_TURN_PAPER = {
    "advantage_estimator": "reinforce_pp", "beta": 0.01, "optim.learning_rate": 5e-7, "rollout_batch_size": 1000,
    "temperature": 1.0,
    "num_generations": 4, "reas_samples_per_plan": None, "mini_batch_size": 400, "micro_batch_size": 4,
    "meta_max_completion_length": 2048, "reas_max_completion_length": 2048, "generation.backend": "vllm",
    "prompt_filter.num_samples": 10, "prompt_filter.pool_size": None, "prompt_filter.plans_per_question": 4,
    "run.eval_every": 20, "run.save_every": 20, "lm.gradient_checkpointing": True,
    "one_shot": False,  # the paper's prompts (App. G), without the cpu preset's worked example
}
# model -> (hub id, ReMA's #UpdateIteration on MATH, #TrainingEpisode of ReMA / VRP / MRP on MATH)
MATH_MODELS = {"llama3-8b": ("meta-llama/Meta-Llama-3-8B-Instruct", 3, (4, 12, 10)),
               "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", 3, (4, 6, 6)),
               "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", 10, (4, 6, 6))}
# model -> (hub id, filter bounds, #TrainingEpisode of ReMA / of VRP and MRP on RewardBench; one round)
JUDGE_MODELS = {"llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", (0.2, 0.8), (2, 4)),
                "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", (0.1, 0.9), (1, 6))}


def single_turn() -> dict[str, tuple[str, dict]]:
    presets = {"cpu": ("CPU-sized: SmolLM2-135M on a + b, one round of Algorithm 1", {})}
    for name, (model, rounds, episodes) in MATH_MODELS.items():
        for mode, epochs in zip(("rema", "vrp", "mrp"), episodes):
            lr = {"optim.learning_rate": 2e-7} if (name, mode) == ("llama3-8b", "vrp") else {}
            presets[f"paper-{name}" + ("" if mode == "rema" else f"-{mode}")] = (
                f"Table 1a {'ReMA' if mode == 'rema' else mode.upper() + '_RL'}, {model}",
                SINGLE_TURN_PAPER | MATH | lr | {"lm.model": model, "mode": mode, "num_train_epochs": epochs,
                                                  "num_update_iterations": rounds if mode == "rema" else 1,
                                                  "filter": mode == "rema"})
    for name, (model, (lo, hi), (rema_epochs, baseline_epochs)) in JUDGE_MODELS.items():
        for mode in ("rema", "vrp", "mrp"):
            presets[f"paper-judge-{name}" + ("" if mode == "rema" else f"-{mode}")] = (
                f"Table 1b {'ReMA' if mode == 'rema' else mode.upper() + '_RL'}, {model} (--judge.split loose: Table 2)",
                SINGLE_TURN_PAPER | JUDGE | {"lm.model": model, "mode": mode, "num_update_iterations": 1, "filter": mode == "rema",
                                             "num_train_epochs": rema_epochs if mode == "rema" else baseline_epochs,
                                             "prompt_filter.eps_min": lo, "prompt_filter.eps_max": hi})
    return presets


def multi_turn() -> dict[str, tuple[str, dict]]:
    return {
        "cpu": ("CPU-sized: SmolLM2-135M on a + b, 2 turns of 32 tokens, a worked example for the MTA", {}),
        "paper-qwen2.5-7b": ("Sec. 4.3 multi-turn ReMA: Qwen2.5-7B after sft.py (runs/sft_qwen7b/model), MATH levels 3-5",
                             MATH_LV3TO5 | {"lm.model": "runs/sft_qwen7b/model", "rollout_batch_size": 128, "num_generations": 16,
                                     "max_turns": 30, "max_completion_length": 512, "max_context_length": 4096,
                                     "mask_unfinished_reward": True, "stop_when_truncated": True, "temperature": 1.0,
                                     "optim.learning_rate": 1e-6, "optim.weight_decay": 0.01, "mini_batch_size": 1024,
                                     "micro_batch_size": 4, "total_steps": 500, "generation.backend": "vllm",
                                     "run.eval_every": 10, "run.save_every": 10, "one_shot": False,
                                     "lm.gradient_checkpointing": True}),
    }
