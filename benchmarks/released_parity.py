"""Our likelihood processes beside the paper's released code (Astro-Eric/DiPOD-release).

    python benchmarks/released_parity.py --release /path/to/DiPOD-release [--seeds 300] [--json OUT]

``--release`` is a checkout (or a ``git archive`` export) holding ``language/SPG/spg/spg_trainer.py``
and ``language/d1/diffu-grpo/diffu_grpo_trainer.py``. Their trainer classes are imported as they
are; the packages they import but these functions never use (trl, wandb) are replaced by empty
stand-ins when missing. A small seeded transformer whose log-probs depend on the whole input is the
model. Two checks, for SPG's ``block_random`` and the d1 fork's FPO ``random`` process:

1. Same draws: the released code draws its masks (its own ``forward_process`` / stored FPO
   randomness); our ``score_draw`` scores exactly those masks; the per-sequence ELBO and EUBO
   must agree to float32 rounding (SPG's per-token values times L).
2. Same laws: over many seeds, the released draws and ours (``draw_masks``, our own generator)
   give the same distributions of the chosen block, the masked count, ``|scored|`` and the
   per-draw ELBO (two-sample Kolmogorov-Smirnov statistics and means / stds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from dipod.lm.model import MaskedDiffusionLM
from dipod.lm.proxies import MaskDraw, ProxySettings, draw_masks, live_mask, score_draw

MASK, PAD, EOS, VOCAB = 1, 0, 2, 40
PROMPT, GEN, BLOCK, BATCH = 6, 32, 8, 4


class _StandIn(types.ModuleType):
    """A module whose every attribute is an inert stand-in (a class for capitalised names, a
    pass-through decorator otherwise): enough for the released files' unused imports."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            return type(name, (), {})
        return lambda *args, **kwargs: args[0] if len(args) == 1 and callable(args[0]) else None


def _installed(root: str) -> bool:
    """The real library is importable (a stand-in put there by an earlier call does not count)."""
    if root in sys.modules:
        return not isinstance(sys.modules[root], _StandIn)
    return importlib.util.find_spec(root) is not None


def install_stand_ins() -> list[str]:
    """Stand-ins for trl and wandb where they are not installed; returns the ones replaced."""
    missing = [root for root in ("trl", "wandb") if not _installed(root)]
    # the real libraries look for wandb / trl by spec while importing: import them before any stand-in
    import accelerate.utils  # noqa: F401
    from transformers import PreTrainedModel, Trainer  # noqa: F401
    for name in ("trl", "trl.trainer", "trl.trainer.grpo_trainer", "trl.trainer.grpo_config", "trl.extras",
                 "trl.extras.profiling", "trl.import_utils", "trl.data_utils", "trl.models", "trl.trainer.utils",
                 "wandb"):
        if name.split(".")[0] in missing:
            sys.modules[name] = _StandIn(name)
    return missing


def load_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SmallEncoder(nn.Module):
    """Seeded, input-dependent mask predictor with the forward both releases call."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 32)
        self.pos = nn.Parameter(torch.randn(PROMPT + GEN, 32) * 0.3)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.layer(self.embed(input_ids) + self.pos[: input_ids.shape[1]])
        return SimpleNamespace(logits=self.head(h) * 3.0)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=g)
    completion = torch.randint(3, VOCAB, (BATCH, GEN), generator=g)
    for row, eos_at in enumerate((GEN, 5, 17, 26)[:BATCH]):  # no EOS, and EOS in blocks 0, 2, 3
        completion[row, eos_at:] = EOS
    return prompt, torch.ones_like(prompt), completion


def bare_instance(cls, args):
    """The released trainer class with only ``args`` set (its __init__ needs a whole TRL setup)."""
    trainer = cls.__new__(cls)
    trainer.args = args
    return trainer


def _released_args(**overrides):
    base = dict(mask_id=MASK, forward_type="block_random", num_t=2, min_t=0.0, max_t=1.0, block_length=BLOCK,
                use_mask_prompt=True, p_mask_prompt=0.15, cfg_scale=0.0, logp_estimation="eubo", eubo_beta=1.5,
                mix_weight=0.5)
    return SimpleNamespace(**{**base, **overrides})


def spg_same_draws(spg_cls, lm, prompt, attn, completion, seed: int) -> dict:
    args = _released_args()
    stub = bare_instance(spg_cls, args)
    seq = torch.cat([prompt, completion], 1)
    prompt_index = torch.arange(seq.shape[1]) < PROMPT
    live = live_mask(completion, EOS, ProxySettings(masking="block_random"))
    noisy, _ = stub.forward_process(seq, prompt_index, MASK, seed=seed, completion_mask=live.long())
    masked = noisy == MASK
    prompt_masked = torch.cat([masked[:, :, :PROMPT], torch.zeros(BATCH, 1, PROMPT, dtype=torch.bool)], 1)
    draw = MaskDraw.from_masks(masked[:, :, PROMPT:], live, prompt_masked)
    with torch.no_grad():
        ours = score_draw(lm, prompt, attn, completion, draw, ProxySettings(masking="block_random",
                                                                             block_length=BLOCK, eubo_beta=args.eubo_beta))
        eubo_pt, elbo_pt = stub._get_per_seq_logps(lm.model, seq[None], GEN, [seed], attn, live.long(),
                                                      reward_mask=torch.zeros(BATCH, dtype=torch.bool))
    lengths = live.sum(1)
    return {"elbo_abs_diff": float((ours.elbo_n - elbo_pt[0] * lengths).abs().max()),
            "eubo_abs_diff": float((ours.eubo_n - eubo_pt[0] * lengths).abs().max()),
            "elbo_scale": float(ours.elbo_n.abs().max())}


def fpo_same_draws(fpo_cls, lm, prompt, attn, completion) -> dict:
    stub = bare_instance(fpo_cls, SimpleNamespace(mask_id=MASK))
    seq = torch.cat([prompt, completion], 1)
    live = live_mask(completion, EOS, ProxySettings(masking="random"))
    with torch.no_grad():
        released, randomness = stub._get_sequence_elbo(lm.model, seq, live.long(), num_samples=4)
    masked = torch.stack([matrix[:, PROMPT:] for _, matrix in randomness], 1)
    draw = MaskDraw.from_masks(masked, live, torch.zeros(BATCH, 5, PROMPT, dtype=torch.bool))
    with torch.no_grad():
        ours = score_draw(lm, prompt, attn, completion, draw, ProxySettings(masking="random"))
    return {"elbo_abs_diff": float((ours.elbo_n - released).abs().max()), "elbo_scale": float(released.abs().max())}


def _block_and_count(masked_nkl, live_nl):
    """Per draw: the chosen block (first block with a masked live token) and the masked live count
    of that block; valid only without prompt masking of earlier blocks (p_mask_prompt = 0)."""
    hit = masked_nkl & live_nl.bool()[:, None]
    blocks = torch.arange(GEN) // BLOCK
    block_nk = torch.where(hit, blocks, 10 ** 6).min(-1).values
    count_nk = (hit & (blocks == block_nk[..., None])).sum(-1)
    return block_nk, count_nk


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _summary(released: list, ours: list) -> dict:
    a, b = np.concatenate(released).ravel().astype(float), np.concatenate(ours).ravel().astype(float)
    # ks_5pct: the two-sample KS statistic's 5% critical value for independent samples of these sizes
    return {"released_mean": a.mean(), "ours_mean": b.mean(), "released_std": a.std(), "ours_std": b.std(),
            "ks": _ks(a, b), "ks_5pct": 1.358 * float(np.sqrt(2.0 / len(a))), "n": len(a)}


def laws(spg_cls, fpo_cls, lm, prompt, attn, completion, seeds: int) -> dict:
    seq = torch.cat([prompt, completion], 1)
    prompt_index = torch.arange(seq.shape[1]) < PROMPT
    out = {}
    # SPG block_random, p_mask_prompt 0 (so the block and count are readable from the masks) and 0.15
    for p_mask in (0.0, 0.15):
        settings = ProxySettings(masking="block_random", block_length=BLOCK, p_mask_prompt=p_mask)
        stub = bare_instance(spg_cls, _released_args(p_mask_prompt=p_mask))
        live = live_mask(completion, EOS, settings)
        rows = {k: ([], []) for k in ("block", "count", "scored", "elbo_per_draw")}
        for seed in range(seeds):
            noisy, _ = stub.forward_process(seq, prompt_index, MASK, seed=seed, completion_mask=live.long())
            masked_r = noisy == MASK
            released = MaskDraw.from_masks(masked_r[:, :, PROMPT:], live, torch.cat(
                [masked_r[:, :, :PROMPT], torch.zeros(BATCH, 1, PROMPT, dtype=torch.bool)], 1))
            ours = draw_masks(attn, live, settings, torch.Generator().manual_seed(10 ** 6 + seed))
            for side, draw in enumerate((released, ours)):
                with torch.no_grad():
                    values = score_draw(lm, prompt, attn, completion, draw, settings)
                rows["elbo_per_draw"][side].append((values.elbo_nk / values.lengths_n[:, None]).numpy())
                rows["scored"][side].append(draw.scored_nkl.sum(-1).numpy())
                if p_mask == 0.0:
                    block, count = _block_and_count(draw.masked_nkl, live)
                    rows["block"][side].append(block.numpy())
                    rows["count"][side].append(count.numpy())
        out[f"block_random_p{p_mask}"] = {k: _summary(*v) for k, v in rows.items() if v[0]}
    # FPO random: n and the per-draw ELBO
    settings = ProxySettings(masking="random")
    live = live_mask(completion, EOS, settings)
    stub = bare_instance(fpo_cls, SimpleNamespace(mask_id=MASK))
    rows = {k: ([], []) for k in ("count", "elbo_per_draw")}
    for seed in range(seeds):
        torch.manual_seed(seed)
        with torch.no_grad():
            _, randomness = stub._get_sequence_elbo(lm.model, seq, live.long(), num_samples=4)
        released = MaskDraw.from_masks(torch.stack([m[:, PROMPT:] for _, m in randomness], 1), live,
                                       torch.zeros(BATCH, 5, PROMPT, dtype=torch.bool))
        ours = draw_masks(attn, live, settings, torch.Generator().manual_seed(10 ** 6 + seed))
        for side, draw in enumerate((released, ours)):
            with torch.no_grad():
                values = score_draw(lm, prompt, attn, completion, draw, settings)
            rows["elbo_per_draw"][side].append((values.elbo_nk / values.lengths_n.clamp_min(1)[:, None]).numpy())
            rows["count"][side].append(draw.scored_nkl.sum(-1).numpy())
    out["random"] = {k: _summary(*v) for k, v in rows.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, type=Path, help="checkout or export of Astro-Eric/DiPOD-release")
    parser.add_argument("--seeds", type=int, default=300, help="seeds for the distribution comparison")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    spg_file = args.release / "language/SPG/spg/spg_trainer.py"
    fpo_file = args.release / "language/d1/diffu-grpo/diffu_grpo_trainer.py"
    for path in (spg_file, fpo_file):
        if not path.is_file():
            parser.error(f"{path} not found: --release must hold language/SPG and language/d1 of DiPOD-release")
    torch.set_num_threads(1)
    stood_in = install_stand_ins()
    spg_cls = load_file(spg_file, "released_spg_trainer").SPGTrainer
    fpo_cls = load_file(fpo_file, "released_d1_fork_trainer").DiffuGRPOTrainer
    lm = MaskedDiffusionLM(model=SmallEncoder().eval(), tokenizer=None, mask_id=MASK, pad_id=PAD, eos_id=EOS)

    same = {"block_random": [], "random": []}
    for batch_seed in range(5):
        prompt, attn, completion = _batch(batch_seed)
        for seed in range(4):
            same["block_random"].append(spg_same_draws(spg_cls, lm, prompt, attn, completion, seed))
            torch.manual_seed(100 * batch_seed + seed)
            same["random"].append(fpo_same_draws(fpo_cls, lm, prompt, attn, completion))
    report = {"stand_ins": stood_in,
              "same_draws": {k: {m: max(r[m] for r in v) for m in v[0]} for k, v in same.items()},
              "laws": laws(spg_cls, fpo_cls, lm, *_batch(0), args.seeds)}
    print(json.dumps(report, indent=1, default=float))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    worst = max(v["elbo_abs_diff"] for v in report["same_draws"].values())
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
