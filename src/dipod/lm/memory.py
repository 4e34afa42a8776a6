"""`dipod lm memory`: per-GPU peak memory of a `dipod lm train` config, before any GPU is touched.

It reads the same TrainConfig the trainer reads (``--config FILE`` plus flags), so a plan and a run
cannot disagree about what is loaded. Two phases peak separately:

- **rollout**: weights (+ the reference model, when its KL term is on), the sampler's logits for
  ``generation_batch_size`` rows, and the confidence monitor's float64 softmax over the vocabulary.
- **update**: weights + gradients + AdamW state per engine (below), the activations of one
  micro-batch (``micro`` completions x ``num_draws`` masked copies x prompt+completion tokens) with
  or without whole-layer checkpointing, and its logits. An exact left-to-right estimator (JustGRPO)
  adds one chunk of its ``micro x gen_length`` prefix states (``max_tokens_per_forward // (prompt +
  completion)`` rows, all of them when unset): the chunks are checkpointed, so one chunk's
  activations live at a time, and its logits from the chunk's first position read (at most the whole
  completion, ``dtype`` + float32) plus the float32 tempered and log-softmaxed row at that position;
  its masked copies count only when DiPOD's term reads the ELBO.

Bytes per parameter (P base parameters, N GPUs, w = bytes of ``dtype``): LoRA keeps the base in
``dtype`` on every GPU (ZeRO-3 / FSDP: 1/N of it) and float32 adapters + grads + AdamW (16 bytes per
adapter parameter). Full fine-tuning: DDP float32 master + grads + AdamW = 16 P; ZeRO-2 w P
weights + (w + 12) P / N (gradients, float32 master and AdamW sharded); ZeRO-3 (w + w + 12) P / N;
FSDP2 (4 + 4 + 8) P / N float32 master, grads and AdamW, plus one gathered decoder block in ``dtype``.

Activations per token and decoder layer, in elements of ``dtype`` (a LLaMA-style block: d model
width, f MLP width), from the tensors autograd keeps for backward, measured with
``torch.autograd.graph.saved_tensors_hooks`` on our LLaDA network (tests/test_lm_memory.py; LLaDA's
hub code keeps the same): full fine-tuning 10 d + 4 f, LoRA 8 d + 3 f + r per target (plus n_heads + 2
per token, under 0.1 % at 8B, left out); with checkpointing only each layer's input (d) stays, plus one
layer's activations while it is recomputed. Logits: our network applies the vocabulary head at the
positions the caller reads only (``MaskedDiffusionLM.logits(first=)``: the completion), in ``dtype``
plus its float32 copy, plus the float32 log-softmax. (The legacy hub code, ``--trust_remote_code``,
computes them over the prompt too: add prompt / completion of the logits term.)

Mixture-of-experts layers (LLaDA2.x): the weights, gradients and optimizer state of EVERY expert, the
shared expert and the router count (all of them train); activations count only the ``top_k`` experts
a token is routed to. Per token an MoE layer keeps, in place of a dense MLP's ``2 d + 4 f`` (LoRA
``3 f``): ``3 d + E + top_k (2 d + 4 f_e) + 4 f_s`` (LoRA too, plus ``r`` per target and routed slot):
the normed input, its float32 copy for the router and the ``E`` router scores; per routed slot the
gathered input, the expert's gate / up / SiLU / product (``f_e`` = ``moe_intermediate_size``) and its
output; the shared expert (``f_s``). Measured with saved_tensors_hooks on our LLaDA2 network (tests/test_lm_memory_moe.py).
Under ZeRO-3 / FSDP the gathered decoder block is the largest one (an MoE layer with all its experts).

Block-causal models (SDAR, TraDo, LLaDA2.x) score each masked copy in one forward over ``[clean |
noisy]`` (dipod.lm.processes.block_likelihood): a proxy row is ``2 (prompt + completion)`` tokens.
``kv_cache`` decoding adds the rollout's key/value cache (``layers x 2 x kv x (prompt + completion)``
per row in ``dtype``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from dipod.config import parse_config
from dipod.lm.train_config import TrainConfig, completions_per_process
from dipod.lm.trainer import needs_bounds

GIB = 2 ** 30
ENGINES = ("ddp", "zero2", "zero3", "fsdp")
# Saved-for-backward elements per token and decoder layer (d model width, f MLP width): full fine-
# tuning keeps the inputs of every linear too (weight gradients), LoRA only the adapters' inputs and
# outputs (r per target). Measured on our LLaDA network with saved_tensors_hooks (tests/test_lm_memory.py).
ACT_FULL = (10, 4)  # 10 d + 4 f
ACT_LORA = (8, 3)  # 8 d + 3 f + r per LoRA target
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# MoE layers: elements kept per token per unit of an expert's width (gate, up, SiLU, product; with LoRA too:
# the adapters read the same tensors), measured on our LLaDA2 network (tests/test_lm_memory_moe.py)
MOE_PER_WIDTH = 4
# The published checkpoints this project trains, for planning without a download (their config.json
# facts; docs/lm_paper_configs.md cites each).
_SDAR_8B = dict(d=4096, layers=36, f=12288, vocab=151936, kv=1024, qk_norm=128, block_size=4)  # Qwen3-8B shape
_LLADA2_MINI = dict(d=2048, layers=20, f=5120, vocab=157184, q=2048, kv=512, qk_norm=128, experts=256, top_k=8,
                    expert_f=512, shared_f=512, dense_layers=1, block_size=32)
KNOWN_SHAPES = {
    "GSAI-ML/LLaDA-8B-Instruct": dict(d=4096, layers=32, f=12288, vocab=126464, tied=False),
    "GSAI-ML/LLaDA-8B-Base": dict(d=4096, layers=32, f=12288, vocab=126464, tied=False),
    "GSAI-ML/LLaDA-1.5": dict(d=4096, layers=32, f=12288, vocab=126464, tied=False),
    "Dream-org/Dream-v0-Instruct-7B": dict(d=3584, layers=28, f=18944, vocab=152064, tied=False, kv=512),
    "JetLM/SDAR-8B-Chat": _SDAR_8B,
    "Gen-Verse/TraDo-8B-Instruct": _SDAR_8B,  # SDAR-8B trained with TraceRL: the same network
    "inclusionAI/LLaDA2.0-mini": _LLADA2_MINI,
    "inclusionAI/LLaDA2.1-mini": _LLADA2_MINI,
}


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int  # model width
    layers: int
    f: int  # dense MLP width
    vocab: int
    tied: bool = False
    kv: int | None = None  # key/value width (grouped-query attention); None = d
    q: int | None = None  # query width (heads x head_dim); None = d
    qk_norm: int = 0  # width of the RMSNorm on queries and on keys (head_dim; 0: none)
    experts: int = 0  # routed experts per MoE layer (0: every layer dense)
    top_k: int = 0  # experts per token
    expert_f: int = 0  # one expert's MLP width
    shared_f: int = 0  # the shared expert's MLP width (moe_intermediate_size x num_shared_experts)
    dense_layers: int | None = None  # how many layers keep a dense MLP (_dense_layer_count); None = all
    block_size: int | None = None  # block-causal models: blocks of this many tokens
    family: str | None = None  # the block family config.json's model_type names (its process and LoRA targets)

    @property
    def moe_layers(self) -> int:
        return self.layers - (self.layers if self.dense_layers is None else self.dense_layers)

    def _attention_params(self) -> int:
        q, kv = self.q or self.d, self.kv or self.d
        return 2 * self.d * q + 2 * self.d * kv + 2 * self.qk_norm + 2 * self.d  # q, o, k, v, q/k norms, 2 RMSNorms

    def _moe_params(self, experts: int) -> int:
        """One MoE MLP with ``experts`` routed experts (all of them, or the ``top_k`` a token uses) + shared + router."""
        return 3 * self.d * (experts * self.expert_f + self.shared_f) + self.experts * self.d

    def layer_params(self, moe: bool) -> int:
        return self._attention_params() + (self._moe_params(self.experts) if moe else 3 * self.d * self.f)

    @property
    def params(self) -> int:
        """Every trainable parameter: all experts of every MoE layer, the shared experts, the routers."""
        dense = self.layers - self.moe_layers
        return (dense * self.layer_params(False) + self.moe_layers * self.layer_params(True)
                + self.vocab * self.d * (1 if self.tied else 2) + self.d)

    @property
    def active_params(self) -> int:
        """The parameters one token passes through (MoE: its ``top_k`` experts, the shared one, the router)."""
        moe_active = self._attention_params() + self._moe_params(self.top_k)
        return self.params - self.moe_layers * (self.layer_params(True) - moe_active)

    @property
    def largest_layer_params(self) -> int:
        return self.layer_params(self.moe_layers > 0)

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        q, kv = self.q or self.d, self.kv or self.d
        attention = {"q_proj": (self.d, q), "k_proj": (self.d, kv), "v_proj": (self.d, kv), "attn_out": (q, self.d),
                     "o_proj": (q, self.d), "qkv_proj": (self.d, q + 2 * kv)}
        dense = self.layers - self.moe_layers
        total = self.layers * sum(r * (a + b) for name, (a, b) in attention.items() if name in targets)
        for name in ("ff_proj", "gate_proj", "up_proj", "ff_out", "down_proj"):  # every MLP: dense, experts, shared
            if name in targets:
                total += r * (dense * (self.d + self.f) + self.moe_layers * (
                    self.experts * (self.d + self.expert_f) + (self.d + self.shared_f if self.shared_f else 0)))
        return total


def model_shape(name: str) -> Shape:
    """The shape from a local ``config.json`` (LLaDA or Hugging Face keys, SDAR and LLaDA2 included) or the
    known-checkpoint table."""
    path = Path(name) / "config.json"
    if path.is_file():
        c = json.loads(path.read_text())
        if "d_model" in c:  # LLaDA's own config
            return Shape(d=c["d_model"], layers=c["n_layers"], f=c.get("mlp_hidden_size") or c["mlp_ratio"] * c["d_model"],
                         vocab=c.get("embedding_size") or c["vocab_size"], tied=bool(c.get("weight_tying")),
                         kv=c["d_model"] // c["n_heads"] * (c.get("n_kv_heads") or c["n_heads"]))
        heads, model_type = c["num_attention_heads"], str(c.get("model_type", "")).lower()
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        moe = dict(experts=c["num_experts"], top_k=c["num_experts_per_tok"], expert_f=c["moe_intermediate_size"],
                   shared_f=c["moe_intermediate_size"] * c.get("num_shared_experts", 0),
                   dense_layers=_dense_layer_count(c)) if c.get("num_experts") else {}
        block = {"sdar": c.get("block_size", 4), "sdar_moe": c.get("block_size", 4),
                 "llada2_moe": 32}.get(model_type)  # families.py: the block sizes
        return Shape(d=c["hidden_size"], layers=c["num_hidden_layers"], f=c["intermediate_size"], vocab=c["vocab_size"],
                     tied=bool(c.get("tie_word_embeddings")), q=heads * head_dim,
                     kv=head_dim * c.get("num_key_value_heads", heads),
                     qk_norm=head_dim if model_type in ("sdar", "sdar_moe", "llada2_moe", "qwen3") else 0,
                     block_size=block, family=model_type if block else None, **moe)
    if name in KNOWN_SHAPES:
        return Shape(**KNOWN_SHAPES[name])
    raise FileNotFoundError(f"model {name!r}: no local config.json and not one of {sorted(KNOWN_SHAPES)}; pass a "
                            f"local model folder")


def _dense_layer_count(c: dict) -> int:
    """How many layers of an MoE config.json keep a dense MLP: LLaDA2's first ``first_k_dense_replace``;
    SDAR-MoE's (Qwen3-MoE's) ``mlp_only_layers`` and the layers off its ``decoder_sparse_step``."""
    if "first_k_dense_replace" in c:
        return c["first_k_dense_replace"]
    from dipod.lm.networks.sdar import moe_layer_indices

    layers = c["num_hidden_layers"]
    return layers - len(moe_layer_indices(layers, c.get("mlp_only_layers"), c.get("decoder_sparse_step", 1)))


def layer_elements_per_token(shape: Shape, lora_r: int = 0, lora_targets: int = 0, moe: bool = False) -> int:
    """Elements one decoder layer keeps for backward per token (no checkpointing); ``moe``: an MoE layer,
    whose MLP terms count the ``top_k`` routed experts and the shared one (module docstring)."""
    a, b = ACT_LORA if lora_r > 0 else ACT_FULL
    lora = lora_r * lora_targets if lora_r > 0 else 0
    if not moe:
        return a * shape.d + b * shape.f + lora
    # LoRA: r per target and routed slot (the shared expert's and attention's counted as slots: an upper bound)
    return ((a - 2) * shape.d + 3 * shape.d + shape.experts + shape.top_k * (2 * shape.d + MOE_PER_WIDTH * shape.expert_f)
            + MOE_PER_WIDTH * shape.shared_f + lora * (shape.top_k + 1))


def activation_bytes_per_token(shape: Shape, elem: int, checkpointing: bool, lora_r: int = 0,
                               lora_targets: int = 0) -> int:
    """Bytes kept for backward per token of one forward (all layers). With whole-layer checkpointing
    each layer keeps its input (d) and one layer at a time is recomputed in full."""
    dense = layer_elements_per_token(shape, lora_r, lora_targets) * elem
    moe = layer_elements_per_token(shape, lora_r, lora_targets, moe=True) * elem if shape.moe_layers else 0
    if checkpointing:
        return shape.layers * shape.d * elem + max(dense if shape.moe_layers < shape.layers else 0, moe)
    return (shape.layers - shape.moe_layers) * dense + shape.moe_layers * moe


def left_to_right_chunk_rows(cfg: TrainConfig, micro: int) -> int:
    """Rows of one chunk of the exact left-to-right likelihood (dipod.lm.left_to_right): a micro-batch's
    ``micro x gen_length`` states, at most ``max_tokens_per_forward // (prompt + completion)`` at a time."""
    rows = micro * cfg.gen_length
    if cfg.max_tokens_per_forward is None:
        return rows
    return min(rows, max(1, cfg.max_tokens_per_forward // (cfg.max_prompt_length + cfg.gen_length)))


def plan(cfg: TrainConfig, num_gpus: int, engine: str = "zero2") -> dict:
    """Per-GPU bytes of each term, per phase, and the peak (module docstring)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; choose one of {ENGINES}")
    from dipod.lm.families import FAMILIES

    shape, w = model_shape(cfg.model), _BYTES[cfg.dtype]
    family = FAMILIES[cfg.model_family or _family_name(cfg.model, shape)]
    P, N = shape.params, num_gpus
    sharded = engine in ("zero3", "fsdp")
    base_w = 0.5 if cfg.load_in_4bit else w
    targets = tuple(cfg.lora_target_modules or family.lora_targets) if cfg.lora_r > 0 else ()
    if cfg.lora_r > 0:
        lora = shape.lora_params(cfg.lora_r, targets)
        weights = P * base_w / (N if sharded else 1)
        train_state = 16 * lora / (N if engine != "ddp" else 1)
    else:
        weights = {"ddp": 4 * P, "zero2": w * P, "zero3": w * P / N, "fsdp": 4 * P / N}[engine]
        train_state = {"ddp": 12 * P, "zero2": (w + 12) * P / N, "zero3": (w + 12) * P / N,
                       "fsdp": 12 * P / N}[engine]
    gathered_layer = shape.largest_layer_params * w if sharded else 0
    reference = P * base_w if cfg.kl_beta_value() > 0 and cfg.lora_r == 0 else 0  # LoRA: adapters disabled
    world_rows = cfg.prompts_per_step * cfg.num_generations
    n_local = world_rows // N
    micro = max(1, n_local // cfg.gradient_accumulation_steps)
    prompt, gen = cfg.max_prompt_length, cfg.gen_length
    copies = 2 if family.process == "block_causal" else 1  # [clean | noisy] in one forward
    per_token = activation_bytes_per_token(shape, w, cfg.gradient_checkpointing, cfg.lora_r, len(targets))
    bound_rows = micro * cfg.num_draws_value() if needs_bounds(cfg) else 0
    tokens = bound_rows * copies * (prompt + gen)
    activations = tokens * per_token
    logits = bound_rows * gen * shape.vocab * (w + 4 + 4)
    if cfg.left_to_right():
        rows = left_to_right_chunk_rows(cfg, micro)
        tokens += rows * (prompt + gen)
        activations += rows * (prompt + gen) * per_token
        logits += rows * shape.vocab * (gen * (w + 4) + 4 + 4)
    gen_rows = cfg.generation_batch_size or n_local
    sampler_logits = gen_rows * gen * shape.vocab * (w + 4)  # from the current block to the end
    monitor = gen_rows * gen * shape.vocab * (4 + 8 + 8)  # float32 logits, float64 log-softmax and probs
    kv_cache = gen_rows * shape.layers * 2 * (shape.kv or shape.d) * (prompt + gen) * w if cfg.kv_cache else 0
    common = {"weights": weights, "optimizer_and_gradients": train_state, "reference_model": reference,
              "gathered_layer": gathered_layer}
    rollout = {**common, "sampler_logits": sampler_logits, "monitor": monitor, "kv_cache": kv_cache}
    update = {**common, "activations": activations, "logits": logits}
    peak = max(sum(rollout.values()), sum(update.values()))
    return {"model": cfg.model, "engine": engine, "num_gpus": N, "params": P, "active_params": shape.active_params,
            "micro_batch": micro,
            "tokens_per_micro_batch": tokens, "gradient_checkpointing": cfg.gradient_checkpointing,
            "rollout_gib": {k: v / GIB for k, v in rollout.items()},
            "update_gib": {k: v / GIB for k, v in update.items()},
            "rollout_peak_gib": sum(rollout.values()) / GIB, "update_peak_gib": sum(update.values()) / GIB,
            "peak_gib_per_gpu": peak / GIB}


def _family_name(model: str, shape: Shape) -> str:
    """The family of a model named without ``model_family``: a block-causal config.json names its own; a
    block-causal shape of the known-checkpoint table is SDAR or LLaDA2 (MoE)."""
    if shape.family:
        return shape.family
    if shape.block_size:
        return "llada2_moe" if shape.experts else "sdar"
    return "dream" if "dream" in model.lower() else "llada"


def fixes(cfg: TrainConfig, result: dict, budget_gib: float, num_gpus: int, engine: str) -> list[str]:
    """Settings that bring the plan under ``budget_gib``, each checked by re-planning."""
    candidates = [("--gradient_checkpointing true", dict(gradient_checkpointing=True))]
    if cfg.left_to_right():  # the largest left-to-right chunk (halving its rows) that fits
        seq, rows = cfg.max_prompt_length + cfg.gen_length, left_to_right_chunk_rows(cfg, result["micro_batch"])
        while rows > 1:
            rows //= 2
            trial = dataclasses.replace(cfg, gradient_checkpointing=True, max_tokens_per_forward=rows * seq)
            if plan(trial, num_gpus, engine)["peak_gib_per_gpu"] <= budget_gib:
                break
        candidates.append((f"--max_tokens_per_forward {rows * seq}", dict(max_tokens_per_forward=rows * seq)))
    candidates += [
                  (f"--generation_batch_size {max(1, (cfg.generation_batch_size or 8) // 2)}",
                   dict(generation_batch_size=max(1, (cfg.generation_batch_size or 8) // 2))),
                  (f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps * 2}",
                   dict(gradient_accumulation_steps=cfg.gradient_accumulation_steps * 2))]
    found, changes = [], {}
    for flag, change in candidates:
        changes.update(change)
        try:
            trial = plan(dataclasses.replace(cfg, **changes), num_gpus, engine)
        except ValueError:
            continue
        if trial["peak_gib_per_gpu"] < result["peak_gib_per_gpu"]:
            found.append(flag)
        if trial["peak_gib_per_gpu"] <= budget_gib:
            return found
    return found + ["more GPUs (--num_gpus) or --engine zero3"]


def memory_warning(cfg: TrainConfig, num_gpus: int, engine: str, budget_gib: float) -> str | None:
    """The warning the trainer prints before any compute when the plan exceeds ``budget_gib`` (None
    when it fits, or when the model's shape is unknown here)."""
    try:
        result = plan(cfg, num_gpus, engine)
    except FileNotFoundError:
        return None
    if result["peak_gib_per_gpu"] <= budget_gib:
        return None
    return (f"dipod lm memory plans {result['peak_gib_per_gpu']:.1f} GiB per GPU for this run ({engine}, {num_gpus} "
            f"GPU(s); rollout {result['rollout_peak_gib']:.1f}, update {result['update_peak_gib']:.1f}) but a GPU "
            f"has {budget_gib:.1f} GiB; try " + ", ".join(fixes(cfg, result, budget_gib, num_gpus, engine)))


def render(result: dict) -> str:
    lines = [f"{result['model']} on {result['num_gpus']} GPU(s), {result['engine']}: {result['params'] / 1e9:.3f}e9 "
             f"parameters ({result['active_params'] / 1e9:.3f}e9 per token), micro-batch {result['micro_batch']} completions = {result['tokens_per_micro_batch']} tokens "
             f"per forward (gradient_checkpointing {result['gradient_checkpointing']})"]
    for phase in ("rollout", "update"):
        terms = ", ".join(f"{k} {v:.1f}" for k, v in result[f"{phase}_gib"].items() if v)
        lines.append(f"  {phase:<8} {result[f'{phase}_peak_gib']:6.1f} GiB per GPU  ({terms})")
    lines.append(f"  peak     {result['peak_gib_per_gpu']:6.1f} GiB per GPU")
    return "\n".join(lines)


def _positive(own: dict[str, str], flag: str, kind: type) -> int | float:
    """The value of one of this command's own flags, refused unless a number above 0 (a plan for 0 or
    -2 GPUs, or a negative budget, means nothing)."""
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(own[flag])
    except ValueError:
        raise ValueError(f"{flag} {own[flag]!r} is not {what}; pass {what} above 0, e.g. {flag} 8") from None
    if not value > 0:
        raise ValueError(f"{flag} {own[flag]} must be above 0; pass e.g. {flag} 8")
    return value


def main(argv: list[str], prog: str = "dipod lm memory") -> int:
    own = {"--num_gpus": "8", "--gpu_memory_gib": "80", "--engine": "zero2"}
    rest, json_out = [], "--json" in argv
    args = [a for a in argv if a != "--json"]
    i = 0
    while i < len(args):
        if args[i] in own and i + 1 < len(args):
            own[args[i]] = args[i + 1]
            i += 2
        else:
            rest.append(args[i])
            i += 1
    cfg = parse_config(TrainConfig, rest, prog, description="Per-GPU peak memory of a `dipod lm train` config "
                       "(own flags: --num_gpus N, --gpu_memory_gib G, --engine ddp|zero2|zero3|fsdp, --json)")
    num_gpus, budget, engine = _positive(own, "--num_gpus", int), _positive(own, "--gpu_memory_gib", float), own["--engine"]
    completions_per_process(cfg, num_gpus)  # a plan for a run the trainer would refuse means nothing
    result = plan(cfg, num_gpus, engine)
    result["gpu_memory_gib"] = budget
    result["fits"] = result["peak_gib_per_gpu"] <= budget
    if not result["fits"]:
        result["fixes"] = fixes(cfg, result, budget, num_gpus, engine)
    if json_out:
        print(json.dumps(result, indent=1))
    else:
        print(render(result))
        if not result["fits"]:
            print(f"WARNING: plans {result['peak_gib_per_gpu']:.1f} GiB per GPU > {budget:g} GiB; try "
                  + ", ".join(result["fixes"]), file=sys.stderr)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
