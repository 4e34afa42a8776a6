"""The flags of a two-step ``dipod lm train`` smoke run on a tiny snapshot (shared by the family tests)."""

from __future__ import annotations


def smoke_flags(model, output_dir, estimator: str, *extra: str, block_length: int, diffusion_steps: int,
                dipod_beta: float = 0.05) -> list[str]:
    """Two RL steps on sudoku4 with DiPOD (beta 0.05 unless told), two prompts x two completions of 16 tokens, no LoRA."""
    return ["--model", str(model), "--task", "sudoku4", "--prompt_style", "compact", "--estimator", estimator,
            *extra, "--dipod_beta", str(dipod_beta), "--lora_r", "0", "--learning_rate", "1e-3",
            "--prompts_per_step", "2", "--num_generations", "2", "--gradient_accumulation_steps", "1",
            "--gen_length", "16", "--block_length", str(block_length), "--diffusion_steps", str(diffusion_steps),
            "--num_iterations", "2", "--max_prompt_length", "96", "--max_steps", "2", "--eval_examples", "1",
            "--eval_steps", "0", "--save_steps", "0", "--gap_monitor_steps", "0", "--num_draws", "2",
            "--temperature", "1.0", "--tensorboard", "false", "--progress_bar", "false", "--output_dir",
            str(output_dir)]
