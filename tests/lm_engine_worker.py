"""One process of the per-engine resume test (tests/test_lm_engines.py), under `accelerate launch`.

argv: OUTPUT_DIR MODEL MAX_STEPS LORA_R STOP_AFTER [--resume]. Trains the given model on sudoku4 for
MAX_STEPS (resuming from OUTPUT_DIR's latest checkpoint with --resume). STOP_AFTER > 0 ends the run
as a kill would, right after step STOP_AFTER's checkpoint; otherwise the run writes OUTPUT_DIR/final_model
(gathered from every rank under ZeRO-3 / FSDP) and the main process writes the final trainable weights
gathered from every rank to OUTPUT_DIR/final_weights.safetensors. The model loads into our own network
(the default path, as `dipod lm train --model` without --trust_remote_code).
"""

import sys

import torch
from safetensors.torch import save_file

from dipod.lm.train_config import TrainConfig
from dipod.lm.trainer import Trainer

torch.set_num_threads(1)
torch.manual_seed(0)  # the LoRA adapters' initial values (the trainer may seed them itself; issue 17)
out, model, max_steps, lora_r, stop_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = TrainConfig(model=model, task="sudoku4", prompt_style="compact", lora_r=lora_r,
                  lora_alpha=16.0, lora_dropout=0.0, dtype="float32", prompts_per_step=2, num_generations=4,
                  gradient_accumulation_steps=2, gen_length=16, block_length=16, diffusion_steps=4, num_iterations=2,
                  estimator="fpo", num_draws=2, masking="unbiased_random", learning_rate=3e-3, max_grad_norm=0.5,
                  lr_scheduler="cosine", warmup_steps=1, max_steps=max_steps, save_steps=1, eval_steps=0,
                  eval_examples=2, gap_monitor_steps=0, tensorboard=False, progress_bar=False,
                  save_final_model=not stop_after, output_dir=out, resume="latest" if "--resume" in sys.argv else None)
trainer = Trainer(cfg)
# The untrained model scores 0 on sudoku; a reward that varies with the text makes the advantages non-trivial.
trainer.reward_names, trainer.reward_fns = ["length_mod_5"], [lambda text, example: (len(text) % 5) / 4.0]
trainer.reward_weights = torch.ones(1)

class Killed(Exception):
    pass


original_step = trainer.step


def step_or_die(step):
    if stop_after and step == stop_after + 1:
        raise Killed
    return original_step(step)


trainer.step = step_or_die
try:
    trainer.run()
except Killed:
    sys.exit(0)
acc = trainer.accelerator
state = acc.get_state_dict(trainer.model)  # gathered from the shards (a collective: every rank calls it)
if acc.is_main_process:
    trained = {name for name, p in acc.unwrap_model(trainer.model).named_parameters() if p.requires_grad}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items() if k in trained or
               any(k.endswith(t) for t in trained)}, f"{out}/final_weights.safetensors")
