"""One process of the 2-process `accelerate launch` smoke test (tests/test_lm_trainer_ddp.py).

Trains the tiny model for a few steps with groups that span the two processes, then writes this
process's parameters and, per step, the advantages it used and the rewards it gathered. An optional
third argument, a JSON object, changes TrainConfig fields (e.g. another estimator).
"""

import dataclasses
import json
import sys

import torch
from safetensors.torch import save_file

from dipod.lm.train_config import TrainConfig
from dipod.lm.trainer import Trainer

torch.set_num_threads(1)
out, model = sys.argv[1], sys.argv[2]
cfg = TrainConfig(model=model, task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                  prompts_per_step=3, num_generations=4,  # 12 rollouts, 6 per process: group 2 spans both
                  gradient_accumulation_steps=2, gen_length=24, block_length=24, diffusion_steps=4, num_iterations=2,
                  estimator="fpo", learning_rate=1e-3, max_steps=2, save_steps=2, eval_steps=0, eval_examples=3,
                  gap_monitor_steps=2, gap_monitor_sequences=1, gap_monitor_orders=2, tensorboard=False,
                  progress_bar=False, save_final_model=False, output_dir=out)
cfg = dataclasses.replace(cfg, **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))
trainer = Trainer(cfg)
# The untrained model scores 0 on sudoku; a reward that varies with the text makes the advantages non-trivial.
trainer.reward_names, trainer.reward_fns = ["length_mod_5"], [lambda text, example: (len(text) % 5) / 4.0]
trainer.reward_weights = torch.ones(1)
seen: dict[str, torch.Tensor] = {}
original = trainer.advantages


def recording(rewards_nf, step):
    adv_n, all_rewards_nf = original(rewards_nf, step)
    index = len(seen) // 3
    seen[f"adv_{index}"], seen[f"all_rewards_{index}"], seen[f"local_rewards_{index}"] = adv_n, all_rewards_nf, rewards_nf
    return adv_n, all_rewards_nf


trainer.advantages = recording
result = trainer.run()
rank = trainer.accelerator.process_index
tensors = {f"param/{k}": v.detach().contiguous() for k, v in result.model.named_parameters()}
tensors.update({k: v.contiguous() for k, v in seen.items()})
save_file(tensors, f"{out}/rank{rank}.safetensors")
