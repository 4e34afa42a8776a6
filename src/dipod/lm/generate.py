"""`dipod lm generate`: print a few completions of a model on a task, with their rewards.

Same flags as `dipod lm eval` (model, task, data, decoding; the model recipe's by default) plus
``--n``, the number of examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dipod.config import ConfigError
from dipod.lm.evaluate import DecodeConfig, evaluate_policy, load_for_decoding, parse_decode_config
from dipod.lm.sampler import family_sampler_defaults


@dataclass
class GenerateConfig(DecodeConfig):
    n: int = field(default=4, metadata={"help": "number of examples to decode and print"})

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n={self.n} must be >= 1")
        if self.limit is None:
            self.limit = self.n
        super().__post_init__()


def main(argv: list[str], prog: str = "dipod lm generate") -> int:
    cfg = parse_decode_config(GenerateConfig, argv, prog, description="Print completions of a model on a task's prompts.")
    lm, task, examples = load_for_decoding(cfg)
    settings = cfg.sampler_settings().resolved(family_sampler_defaults(lm))
    report = evaluate_policy(lm, task, examples[:cfg.n], settings, prompt_style=cfg.prompt_style,
                             max_prompt_length=cfg.max_prompt_length, batch_size=cfg.batch_size, seed=cfg.seed)
    for i, row in enumerate(report["results"]):
        print(f"--- example {i}  reward {row['reward']:.3f}  correct {row['correct']}")
        print(f"prompt:     {row['prompt']!r}")
        print(f"completion: {row['completion']!r}")
    return 0
