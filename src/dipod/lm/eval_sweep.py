"""`dipod lm eval-sweep RUN_DIR`: the paper's evaluation of every checkpoint of a training run.

The protocol of the d1/SPG/DiPOD papers: greedy decoding, steps = length / 2, blocks of 32, at
generation lengths 128, 256 and 512, on the full test set, in the run's prompt style (d1 prompts
get the evaluation's ``<reasoning>`` response prefix). Every ``checkpoint-STEP`` of the run (and
the initial model, as step 0) is decoded on a validation split and on the test split; the
checkpoint reported is the one with the best mean validation accuracy over the lengths (ties:
the earlier step), never one chosen on test. Output in ``RUN_DIR/eval_sweep/``: ``results.json``
(every record carries its protocol), ``table.md`` and ``accuracy.png``. See docs/lm_eval_sweep.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from dipod.config import ConfigError, config_from_dict, load_yaml_mapping, option, parse_config, require
from dipod.runlog import atomic_write_json, atomic_write_text

# Test split the paper reports per task, and the held-out split used for choosing a checkpoint
# (our generated `test` splits, which are not the paper's files; gsm8k and math500 have none
# offline: pass --val_data, e.g. a file or openai/gsm8k with --val_split train).
PAPER_LENGTHS, PAPER_BLOCK_LENGTH, PAPER_STEPS_PER_TOKEN = (128, 256, 512), 32, 0.5
TEST_SPLIT = {"sudoku4": "spg_test", "countdown": "d1_test", "gsm8k": "test", "math500": "test"}
VAL_SPLIT = {"sudoku4": "test", "countdown": "test"}


@dataclass
class SweepConfig:
    run_dir: str = option("training run folder: config.yaml and checkpoint-STEP folders (also the first argument)",
                          default="")
    lengths: list[int] | None = option("generation lengths to evaluate (None: the paper's 128, 256, 512 for a run "
                                       "that decodes as the paper's, else the run's gen_length)", default=None)
    steps_per_token: float | None = option("sampler steps per generated token (None: the run's diffusion_steps / "
                                           "gen_length; paper: 0.5, i.e. steps = length / 2)", default=None)
    block_length: int | None = option("semi-autoregressive block length, capped at the length (None: the run's; "
                                      "paper: 32)", default=None)
    test_split: str | None = option("test split (None: the paper's for the task, e.g. sudoku4 spg_test)", default=None)
    test_data: str | None = option("test data file or hub id instead of test_split", default=None)
    limit: int | None = option("evaluate only the first LIMIT test examples (None: the full test set)", default=None)
    val_split: str | None = option("validation split that chooses the checkpoint (None: the task's generated "
                                   "held-out split; 'none': no choice)", default=None)
    val_data: str | None = option("validation data file or hub id instead of val_split", default=None)
    val_limit: int | None = option("validation examples used", default=256)
    prompt_style: str | None = option("prompt style (None: the run's)", default=None)
    max_prompt_length: int | None = option("prompt token limit (None: the run's)", default=None)
    batch_size: int = option("prompts decoded per sampler call", default=64)
    dtype: str | None = option("model dtype (None: the run's)", default=None)
    device: str = option("torch device", default="cpu")
    seed: int = option("sampler seed (only matters for non-greedy options)", default=0)
    include_base: bool = option("also evaluate the initial model as step 0", default=True)
    output_dir: str | None = option("where results go (None: RUN_DIR/eval_sweep)", default=None)

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "RUN_DIR is required: dipod lm eval-sweep RUN_DIR [flags]")
        require(Path(self.run_dir, "config.yaml").is_file(),
                f"{self.run_dir}/config.yaml not found; RUN_DIR must be the output_dir of a `dipod lm train` run")
        require(self.lengths is None or (bool(self.lengths) and all(n >= 1 for n in self.lengths)),
                f"lengths={self.lengths} must be positive")
        require(self.steps_per_token is None or 0.0 < self.steps_per_token <= 1.0,
                f"steps_per_token={self.steps_per_token} must be in (0, 1]")
        require((self.block_length is None or self.block_length >= 1) and self.batch_size >= 1,
                "block_length and batch_size must be >= 1")
        for name in ("limit", "val_limit"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name}={value} must be >= 1 (or none)")


def read_run_config(run_dir: str | Path):
    from dipod.lm.train_config import TrainConfig

    path = Path(run_dir, "config.yaml")
    if Path(run_dir, "sft_result.json").is_file():  # an `lm sft` run: its config is not a train config
        raise ConfigError(f"{run_dir} is a `dipod lm sft` run; eval-sweep reads `dipod lm train` runs. Evaluate "
                          f"its model with `dipod lm eval --model {Path(run_dir, 'model')}`")
    return config_from_dict(TrainConfig, load_yaml_mapping(path), source=str(path))


def run_protocol(run_cfg, cfg: SweepConfig) -> SweepConfig:
    """``cfg`` with unset lengths / block length / steps per token taken from the run: the paper's three
    lengths when the run decodes as the paper's (blocks of 32, half a step per token), else its own length."""
    run_steps_per_token = run_cfg.diffusion_steps / run_cfg.gen_length
    paper_like = (run_cfg.block_length == PAPER_BLOCK_LENGTH and run_steps_per_token == PAPER_STEPS_PER_TOKEN
                  and run_cfg.gen_length in PAPER_LENGTHS)
    return dataclasses.replace(
        cfg, lengths=cfg.lengths or (list(PAPER_LENGTHS) if paper_like else [run_cfg.gen_length]),
        block_length=cfg.block_length or run_cfg.block_length,
        steps_per_token=cfg.steps_per_token or run_steps_per_token)


def length_settings(run_cfg, cfg: SweepConfig) -> dict[int, object]:
    """Greedy sampler settings per length: the run's decoding options, the protocol's step rule."""
    settings = {}
    base = run_cfg.sampler_settings(0.0)
    for length in cfg.lengths:
        block = min(cfg.block_length, length)
        require(length % block == 0, f"length {length} is not a multiple of block_length={block}; pick lengths "
                                     "that are (the paper: 128, 256, 512 with blocks of 32)")
        steps = max(length // block, round(length * cfg.steps_per_token))
        try:
            settings[length] = dataclasses.replace(base, gen_length=length, block_length=block, steps=steps)
        except ConfigError as exc:
            raise ConfigError(f"length {length}: {exc}") from None
    return settings


def load_splits(task, cfg: SweepConfig) -> tuple[tuple[str, list[dict]], tuple[str, list[dict]] | None]:
    """((test name, examples), (validation name, examples) or None), refusing a validation set
    that is the test set."""
    test_split = cfg.test_split or TEST_SPLIT.get(task.name, "test")
    val_split = cfg.val_split or VAL_SPLIT.get(task.name)
    test_name = cfg.test_data or test_split
    test = task.load(test_split, path=cfg.test_data, limit=cfg.limit)
    if cfg.val_data is None and (val_split is None or val_split == "none"):
        return (test_name, test), None
    val_name = cfg.val_data or val_split
    require(val_name != test_name, f"the validation set {val_name!r} is the test set; a checkpoint is never chosen "
                                   "on test: pass --val_split or --val_data naming other data")
    val = task.load(val_split or "train", path=cfg.val_data, limit=cfg.val_limit)
    test_rows = {json.dumps(ex, sort_keys=True, default=str) for ex in test}
    require(not all(json.dumps(ex, sort_keys=True, default=str) in test_rows for ex in val),
            f"every example of the validation set {val_name!r} is in the test set {test_name!r}; a checkpoint is "
            "never chosen on test: pass --val_split or --val_data naming other data")
    return (test_name, test), (val_name, val)


def load_weights(lm, path: Path) -> None:
    """Copy a checkpoint's trainable weights (full or LoRA) into the loaded policy."""
    from dipod.checkpoint import copy_weights, load_checkpoint

    weights, _, _ = load_checkpoint(path)
    copy_weights(lm.model, weights, path, "was config.yaml edited after training?")


def choose(records: list[dict]) -> dict | None:
    """The trained checkpoint (step 0 only when there is none) with the best mean validation
    paper accuracy over lengths; ties go to the earlier step. None without validation records."""
    by_step: dict[int, list[float]] = {}
    for r in records:
        if r["split_role"] == "validation":
            by_step.setdefault(r["step"], []).append(r["paper_accuracy"])
    if not by_step:
        return None
    candidates = [s for s in by_step if s > 0] or list(by_step)
    step = min(candidates, key=lambda s: (-sum(by_step[s]) / len(by_step[s]), s))
    name = next(r["checkpoint"] for r in records if r["step"] == step)
    return {"checkpoint": name, "step": step, "criterion": "best mean validation accuracy over lengths",
            "validation_accuracy": sum(by_step[step]) / len(by_step[step])}


def sweep(cfg: SweepConfig) -> dict:
    from dipod.checkpoint import list_checkpoints
    from dipod.lm import train_engine
    from dipod.lm.evaluate import decoding_protocol, evaluate_policy
    from dipod.lm.sampler import family_sampler_defaults
    from dipod.lm.tasks import get_task

    run_dir = Path(cfg.run_dir)
    run_cfg = read_run_config(run_dir)
    changes = {k: v for k, v in (("dtype", cfg.dtype), ("prompt_style", cfg.prompt_style),
                                 ("max_prompt_length", cfg.max_prompt_length)) if v is not None}
    run_cfg = run_cfg.with_changes(**changes) if changes else run_cfg
    cfg = run_protocol(run_cfg, cfg)
    print(f"dipod lm eval-sweep: lengths {cfg.lengths}, block_length {cfg.block_length}, steps = length x "
          f"{cfg.steps_per_token:g}, prompt_style {run_cfg.prompt_style} (unset ones from {run_dir}/config.yaml)",
          file=sys.stderr)
    settings = length_settings(run_cfg, cfg)  # every check before the model loads
    task = get_task(run_cfg.task)
    (test_name, test), val = load_splits(task, cfg)
    checkpoints = [(p.name, int(p.name.split("-")[1]), p) for p in list_checkpoints(run_dir)]
    entries = ([("initial model", 0, None)] if cfg.include_base else []) + checkpoints
    require(bool(entries), f"no checkpoint-STEP folders in {run_dir} (and --include_base false): nothing to evaluate")

    lm = train_engine.load_policy(run_cfg, device=cfg.device)
    lm.model.eval()
    family = family_sampler_defaults(lm)
    data_sets = ([("validation", *val)] if val else []) + [("test", test_name, test)]
    records = []
    for name, step, path in entries:
        if path is not None:
            load_weights(lm, path)
        for length, raw in settings.items():
            resolved = raw.resolved(family)
            protocol = decoding_protocol(resolved, prompt_style=run_cfg.prompt_style,
                                         max_prompt_length=run_cfg.max_prompt_length, batch_size=cfg.batch_size,
                                         seed=cfg.seed, dtype=run_cfg.dtype, device=cfg.device)
            for role, data_name, examples in data_sets:
                report = evaluate_policy(lm, task, examples, resolved, prompt_style=run_cfg.prompt_style,
                                         max_prompt_length=run_cfg.max_prompt_length, batch_size=cfg.batch_size,
                                         seed=cfg.seed)
                paper = task.paper_accuracy([r["completion"] for r in report["results"]], examples)
                records.append({"checkpoint": name, "step": step, "length": length, "split_role": role,
                                "data": data_name, "paper_accuracy": paper,
                                **{k: report[k] for k in ("accuracy", "mean_reward", "num_examples", "forward_passes")},
                                "protocol": protocol})
                print(f"{name:>18}  len {length:>4}  {role:<10} {data_name}: paper accuracy {paper:.4f}",
                      file=sys.stderr)
    selected = choose(records)
    summary = {"run_dir": str(run_dir), "model": run_cfg.model, "task": task.name, "test": test_name,
               "validation": val[0] if val else None, "lengths": list(settings),
               "steps_per_token": cfg.steps_per_token, "selected": selected,
               "selected_test_accuracy": None if selected is None else {
                   r["length"]: r["paper_accuracy"] for r in records
                   if r["step"] == selected["step"] and r["split_role"] == "test"},
               "records": records}
    out = Path(cfg.output_dir or run_dir / "eval_sweep")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "table.md", table(summary))
    plot(summary, out / "accuracy.png")
    return summary


def table(summary: dict) -> str:
    """Markdown: one row per checkpoint, test (and validation) accuracy per length."""
    lengths = summary["lengths"]
    roles = ["test"] + (["validation"] if summary["validation"] else [])
    head = ["checkpoint", "step"] + [f"{role.replace('validation', 'val')} {n}" for role in roles for n in lengths]
    value = {(r["step"], r["split_role"], r["length"]): r["paper_accuracy"] for r in summary["records"]}
    lines = [f"{summary['task']}: test {summary['test']}, validation {summary['validation'] or 'none'}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chosen = (summary["selected"] or {}).get("step")
    seen = []
    for r in summary["records"]:
        if (r["checkpoint"], r["step"]) not in seen:
            seen.append((r["checkpoint"], r["step"]))
    for name, step in seen:
        cells = [f"{100 * value[(step, role, n)]:.1f}" for role in roles for n in lengths]
        lines.append("| " + " | ".join([name + (" (selected)" if step == chosen else ""), str(step)] + cells) + " |")
    protocol = summary["records"][0]["protocol"]
    lines += ["", "protocol: " + ", ".join(f"{k}={protocol[k]}" for k in (
        "prompt_style", "temperature", "remasking", "block_length", "dtype", "batch_size", "device"))
        + f", steps = length x {summary['steps_per_token']}"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for length in summary["lengths"]:
        for role, style in (("test", "-o"), ("validation", "--x")):
            rows = sorted((r["step"], r["paper_accuracy"]) for r in summary["records"]
                          if r["length"] == length and r["split_role"] == role)
            if rows:
                ax.plot([s for s, _ in rows], [100 * a for _, a in rows], style, label=f"{role} len {length}")
    if summary["selected"]:
        ax.axvline(summary["selected"]["step"], color="grey", lw=0.8, ls=":", label="selected (validation)")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy as the paper reports it (%)")
    ax.set_title(f"{summary['task']}: {summary['test']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str], prog: str = "dipod lm eval-sweep") -> int:
    if argv and not argv[0].startswith("-"):
        argv = ["--run_dir", argv[0], *argv[1:]]
    cfg = parse_config(SweepConfig, argv, prog, description="The paper's evaluation of every checkpoint of a run.")
    summary = sweep(cfg)
    print(table(summary))
    print(f"wrote {Path(cfg.output_dir or Path(cfg.run_dir) / 'eval_sweep')}/results.json, table.md, accuracy.png")
    return 0
