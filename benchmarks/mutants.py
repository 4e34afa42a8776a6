"""Mutation smoke check: plant small plausible bugs one at a time in a copy of ``src/`` and see
whether the tests that guard that code notice.

Each mutant replaces one exact snippet of one file (the snippet must occur exactly once, so a
refactor that moves the code makes the mutant fail loudly instead of testing nothing) and names
the test files that should catch it. For each mutant the script copies ``src/`` to a temp folder,
applies the change, runs ``pytest -x -q`` on those files with the copy first on ``PYTHONPATH``,
and records ``caught`` (a test failed), ``survived`` (all passed) or ``error`` (the snippet was
not found). Nothing in the working tree is touched.

    nice -n 10 python benchmarks/mutants.py --smoke          # the fast check: 14 mutants, one test each
    nice -n 10 python benchmarks/mutants.py                  # all mutants, a table on stdout
    nice -n 10 python benchmarks/mutants.py --only spg_mix_weight_swapped ckpt_in_place
    python benchmarks/mutants.py --list

Results and the reasons kept for survivors: docs/results/mutants.md. The broad check is mutmut
(docs/results/mutation.md); this one is the quick, targeted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to src/dipod
    old: str
    new: str
    tests: tuple[str, ...]  # test files (or node ids) relative to the repository root
    why: str  # the plausible mistake this stands for


T = "tests/"
MUTANTS = [
    # --- objectives -------------------------------------------------------------------------------
    Mutant("spg_mix_weight_swapped", "objectives.py",
           "mix_weight * eubo_n + (1.0 - mix_weight) * elbo_n", "(1.0 - mix_weight) * eubo_n + mix_weight * elbo_n",
           (T + "test_objectives.py", T + "test_estimator_oracles.py"), "w and 1 - w swapped in SPG's mix"),
    Mutant("spg_positive_reads_eubo", "objectives.py",
           "proxy = torch.where(adv > 0, elbo_n, negative)", "proxy = torch.where(adv >= 0, negative, elbo_n)",
           (T + "test_objectives.py", T + "test_estimator_oracles.py"), "SPG bounds used the wrong way round"),
    Mutant("ppo_clip_one_sided", "objectives.py",
           "clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)", "clipped_ratio = ratio.clamp(max=1.0 + eps_high)",
           (T + "test_objectives.py",), "PPO clip loses its lower edge"),
    Mutant("fpo_ratio_inverted", "objectives.py",
           "ratio = torch.exp(elbo_n - elbo_old_n)", "ratio = torch.exp(elbo_old_n - elbo_n)",
           (T + "test_objectives.py",), "FPO ratio upside down"),
    Mutant("dipod_term_sign", "objectives.py",
           "return -beta * elbo_n.mean()", "return beta * elbo_n.mean()",
           (T + "test_objectives.py", T + "test_estimator_oracles.py"), "DiPOD term loosens the bound"),
    Mutant("d1_kl_sign", "objectives.py",
           "per_token = per_token - kl_beta * kl", "per_token = per_token + kl_beta * kl",
           (T + "test_objectives.py",), "d1's KL penalty rewards drifting"),
    Mutant("fpopp_spo_sign", "objectives.py",
           "spo = ratio * adv - adv.abs() / (2.0 * eps) * (ratio - 1.0) ** 2",
           "spo = ratio * adv + adv.abs() / (2.0 * eps) * (ratio - 1.0) ** 2",
           (T + "test_objectives.py",), "FPO++'s SPO penalty pushes away from the trust region"),
    # --- advantages -------------------------------------------------------------------------------
    Mutant("group_std_biased", "advantages.py",
           "grouped.std(-1, keepdim=True, unbiased=True)", "grouped.std(-1, keepdim=True, unbiased=False)",
           (T + "test_infrastructure.py", T + "test_estimator_oracles.py"), "population instead of sample std"),
    Mutant("degenerate_group_nan", "advantages.py",
           "return adv.masked_fill(constant, 0.0).reshape(-1)", "return adv.reshape(-1)",
           (T + "test_estimator_oracles.py",), "equal-reward group with eps = 0 gives 0/0"),
    Mutant("gae_no_done_cut", "advantages.py",
           "next_adv = delta + gamma * lam * not_done * next_adv", "next_adv = delta + gamma * lam * next_adv",
           (T + "test_infrastructure.py",), "GAE carries advantages across episode ends"),
    # --- proxies ----------------------------------------------------------------------------------
    Mutant("eubo_beta_multiplies", "lm/processes/masked_likelihood.py",
           "per_token_nl = (torch.logsumexp(log_terms_nkl, dim=1) - math.log(draws)) / beta",
           "per_token_nl = (torch.logsumexp(log_terms_nkl, dim=1) - math.log(draws)) * beta",
           (T + "test_lm_proxies.py", T + "test_estimator_oracles.py"), "EUBO power mean with 1/beta inverted"),
    Mutant("eubo_no_draw_mean", "lm/processes/masked_likelihood.py",
           "per_token_nl = (torch.logsumexp(log_terms_nkl, dim=1) - math.log(draws)) / beta",
           "per_token_nl = torch.logsumexp(log_terms_nkl, dim=1) / beta",
           (T + "test_lm_proxies.py", T + "test_estimator_oracles.py"), "EUBO sums draws instead of averaging"),
    Mutant("elbo_weight_dropped", "lm/processes/masked_likelihood.py",
           "elbo_nk = weight_nk * torch.where(scored_nkl, logp_nkl, 0.0).sum(-1)",
           "elbo_nk = torch.where(scored_nkl, logp_nkl, 0.0).sum(-1)",
           (T + "test_lm_proxies.py",), "ELBO without the L / |scored| weight"),
    Mutant("random_masking_ceil", "lm/processes/masked_likelihood.py",
           "num_masked_nk = (t_nk * length_n[:, None].float()).long()  # floor, as the release",
           "num_masked_nk = torch.ceil(t_nk * length_n[:, None].float()).long()",
           (T + "test_lm_proxies.py",), "d1's floor(t L) read as a ceiling"),
    # --- sampler ----------------------------------------------------------------------------------
    Mutant("low_confidence_scores_max", "lm/reveal.py",
           "return probs_blv.gather(-1, tokens_bl.unsqueeze(-1)).squeeze(-1)\n\n\ndef random_score",
           "return probs_blv.max(-1).values\n\n\ndef random_score",
           (T + "test_lm_sampler.py",), "confidence of the argmax, not of the sampled token"),
    Mutant("gumbel_temperature_ignored", "lm/processes/masked_sampling.py",
           "noisy_blv = logits_blv.double() / temperature + gumbel", "noisy_blv = logits_blv.double() + gumbel",
           (T + "test_lm_sampler.py",), "sampling temperature dropped"),
    Mutant("schedule_remainder_last", "lm/reveal.py",
           "return [base + (1 if step < extra else 0) for step in range(steps)]",
           "return [base + (1 if step >= steps - extra else 0) for step in range(steps)]",
           (T + "test_lm_sampler.py",), "LLaDA's remainder given to the last steps"),
    Mutant("eos_fill_off_by_one", "lm/processes/masked_sampling.py",
           "after_first_eos_bg = (is_eos_bg.cumsum(dim=1) - is_eos_bg.long()) > 0",
           "after_first_eos_bg = is_eos_bg.cumsum(dim=1) > 1",
           (T + "test_lm_sampler.py",), "fill after the second EOS instead of the first"),
    # --- graders -----------------------------------------------------------------------------------
    Mutant("answer_region_no_fallback", "lm/tasks/answer_format.py",
           "return region or tagged_answer(text) or \"\"", "return region",
           (T + "test_lm_graders_real.py", T + "test_lm_graders_released.py"),
           "an empty reopened <answer> hides the closed answer before it"),
    Mutant("sudoku_long_answer_tail", "lm/tasks/sudoku4.py",
           "return digits[:CELLS].ljust(CELLS, \"0\")", "return digits[-CELLS:].ljust(CELLS, \"0\")",
           (T + "test_lm_graders_real.py", T + "test_lm_graders_released.py"), "an over-long grid read from its end"),
    # --- control ----------------------------------------------------------------------------------
    Mutant("control_dipod_detached", "control/update.py",
           "            loss = loss + term\n", "            loss = loss + term.detach()\n",
           (T + "test_control_fpo_features.py", T + "test_estimator_oracles.py"), "DiPOD term logged but not trained"),
    Mutant("control_resume_skips_optimizer", "control/runner.py",
           "        self.optimizer.load_state_dict(state[\"optimizer\"])\n", "",
           (T + "test_control_resume.py",), "resume restarts Adam's moments and the learning rate"),
    Mutant("control_resume_skips_reward_scaler", "control/runner.py",
           "        self.reward_scaler.load_state_dict(state[\"reward_scaler\"])\n", "",
           (T + "test_control_resume.py",), "resume restarts the return statistics"),
    Mutant("control_resume_skips_rng", "control/runner.py",
           "        restore_rng_state(state[\"rng\"], {\"train\": self.generator})\n", "",
           (T + "test_control_resume.py",), "resume replays the seed's first random numbers"),
    Mutant("value_clip_min", "control/update.py",
           "return torch.maximum(unclipped, clipped).mean()", "return torch.minimum(unclipped, clipped).mean()",
           (T + "test_control_fpo_features.py", T + "test_control_flow.py"), "PPO value clip takes the optimistic side"),
    # --- checkpoints ------------------------------------------------------------------------------
    Mutant("ckpt_in_place", "checkpoint.py",
           "    tmp = make_temp_dir(f\".checkpoint-{step}.\", output_dir)\n",
           "    shutil.rmtree(final, ignore_errors=True)\n    final.mkdir()\n    tmp = final\n",
           (T + "test_checkpoint_crash.py",), "checkpoint written in place, no temp dir"),
    Mutant("ckpt_tmp_left_on_error", "checkpoint.py",
           "        shutil.rmtree(tmp, ignore_errors=True)\n        if isinstance(exc, Exception)",
           "        if isinstance(exc, Exception)",
           (T + "test_checkpoint_crash.py",), "temp dir left behind when a save fails"),
    Mutant("ckpt_prune_keeps_oldest", "checkpoint.py",
           "for stale in list_checkpoints(output_dir)[:-keep_last]", "for stale in list_checkpoints(output_dir)[keep_last:]",
           (T + "test_checkpoint_crash.py", T + "test_infrastructure.py"), "pruning deletes the newest checkpoints"),
    Mutant("ckpt_rng_not_restored", "checkpoint.py",
           "    torch.set_rng_state(state[\"torch\"])\n", "",
           (T + "test_infrastructure.py", T + "test_control_resume.py"), "torch's global RNG not restored"),
    Mutant("ckpt_disk_full_unnamed", "checkpoint.py",
           "if isinstance(exc, Exception) and _out_of_space(output_dir, exc, weights):",
           "if False:", (T + "test_run_guards.py",), "a full disk reported as 'unexpected pos'"),
    Mutant("ckpt_corrupt_no_fallback", "checkpoint.py",
           "            log.warning(\"%s; trying the one before it\", exc)\n            skipped.append(path.name)\n"
           "            continue\n", "            raise\n",
           (T + "test_checkpoint_crash.py", T + "test_run_guards.py"), "a corrupt newest checkpoint stops the resume"),
    # --- trainer and run folders ------------------------------------------------------------------
    Mutant("lm_dipod_term_subtracted", "lm/trainer.py",
           "        loss = loss + tighten\n", "        loss = loss - tighten\n",
           (T + "test_lm_trainer.py",), "the LM trainer loosens the bound"),
    Mutant("lm_resume_skips_scheduler", "lm/train_checkpoints.py",
           "    trainer.scheduler.load_state_dict(state[\"scheduler\"])\n", "",
           (T + "test_lm_trainer.py",), "a resumed run restarts the learning-rate schedule"),
    Mutant("lora_init_unseeded", "lm/trainer.py",
           "        torch.manual_seed(derive_seed(cfg.seed, _INIT))", "        pass",
           (T + "test_run_guards.py",), "LoRA adapters drawn from an unseeded RNG"),
    Mutant("run_folder_overwritten", "run_folder.py",
           "    if resuming or not holds_run:", "    if True:",
           (T + "test_run_guards.py",), "a new run silently replaces the one in its folder"),
    Mutant("tensorboard_no_purge", "runlog.py",
           "SummaryWriter(str(self.output_dir / \"tb\"), purge_step=resume_from_step)",
           "SummaryWriter(str(self.output_dir / \"tb\"))",
           (T + "test_run_guards.py",), "a resumed run's steps shown twice in TensorBoard"),
    Mutant("control_action_unchecked", "control/runner.py",
           "            if not bool(torch.isfinite(action).all()):", "            if False:",
           (T + "test_run_guards.py",), "a diverged policy blamed on the environment"),
    Mutant("metrics_resume_keeps_rows", "runlog.py",
           "if int(r.get(\"step\", -1)) < resume_from_step]", "]",
           (T + "test_infrastructure.py", T + "test_control_resume.py"), "a resumed run keeps the killed run's rows after its checkpoint"),
    # --- blind: written down before looking for a test that covers them (the others were planted to prove a test)
    Mutant("reward_scaler_no_reset", "control/envs.py",
           "self.running_return = torch.where(dones_n, torch.zeros_like(batch), batch)", "self.running_return = batch",
           (T + "test_control_runner.py", T + "test_control_fpo_features.py", T + "test_estimator_oracles.py"),
           "discounted return not reset at episode ends"),
    Mutant("gap_iw_no_mean", "lm/processes/masked_likelihood.py",
           "iw_n = torch.logsumexp(log_p_nk, dim=1) - math.log(num_orders)", "iw_n = torch.logsumexp(log_p_nk, dim=1)",
           (T + "test_lm_proxies.py", T + "test_lm_monitors.py"), "IW_K sums the orders instead of averaging"),
    Mutant("metrics_nan_unguarded", "runlog.py",
           "        return str(value)  # JSON has no NaN/inf", "        return value  # JSON has no NaN/inf",
           (T + "test_infrastructure.py",), "NaN written as bare JSON NaN"),
    Mutant("sft_loss_no_length_norm", "lm/sft.py",
           "/ p_mask_b / gen_length).mean()", "/ p_mask_b).mean()",
           (T + "test_lm_sft.py",), "SFT loss not divided by the completion length"),
    Mutant("reshuffle_flag_ignored", "control/update.py",
           "if epoch and settings.reshuffle_each_epoch:", "if epoch:",
           (T + "test_control_fpo_features.py",), "every epoch reshuffled whatever the flag"),
    Mutant("dipod_length_weight_mean", "objectives.py",
           "return -beta * elbo_n.sum() / _as_float(lengths_n).sum().clamp_min(1.0)",
           "return -beta * elbo_n.mean() / _as_float(lengths_n).sum().clamp_min(1.0)",
           (T + "test_objectives.py",), "length-weighted DiPOD term divides twice"),
    Mutant("fpo_kl_sign", "objectives.py",
           "kl = (elbo_n - _as_float(elbo_ref)", "kl = (-elbo_n + _as_float(elbo_ref)",
           (T + "test_objectives.py",), "FPO's KL term with the wrong sign"),
    Mutant("prompt_mask_inclusive", "lm/processes/masked_likelihood.py",
           "prompt_masked_ncp = (prompt_u_ncx[..., :prompt_len] < settings.p_mask_prompt)",
           "prompt_masked_ncp = (prompt_u_ncx[..., :prompt_len] <= settings.p_mask_prompt)",
           (T + "test_lm_proxies.py",), "prompt masked with probability p plus the chance u == p"),
    Mutant("time_features_swapped", "control/flow.py",
           "return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)",
           "return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)",
           (T + "test_control_flow.py", T + "test_control_fpo_features.py"), "time features in another order"),
    Mutant("ties_unstable", "lm/reveal.py",
           "order_bl = torch.sort(score_bl, dim=1, descending=True, stable=True).indices",
           "order_bl = torch.sort(score_bl, dim=1, descending=True, stable=False).indices",
           (T + "test_lm_sampler.py",), "equal scores revealed in any order"),
]


# The smoke check (--smoke): one mutant per guarded area, each against the single test that catches it
# (not its whole files), so the set runs in about a minute and CI can afford it on every change.
SMOKE_TESTS = {
    "spg_positive_reads_eubo": T + "test_objectives.py::test_spg_released_loss_with_dipod_by_hand",
    "d1_kl_sign": T + "test_objectives.py::test_d1_k3_kl_term",
    "fpo_ratio_inverted": T + "test_objectives.py::test_fpo_clipped_sequence_ratio",
    "group_std_biased": T + "test_infrastructure.py::test_group_relative_advantages_closed_form",
    "gae_no_done_cut": T + "test_infrastructure.py::test_gae_matches_hand_computation",
    "random_masking_ceil": T + "test_lm_proxies.py::test_random_is_fpo_floor_count_with_weight_l_over_max_n",
    "schedule_remainder_last": T + "test_lm_sampler.py::test_reveal_schedule_splits_evenly_with_the_remainder_first",
    "eos_fill_off_by_one": T + "test_lm_sampler.py::test_positions_after_the_first_eos_become_eos",
    "answer_region_no_fallback": T + "test_lm_graders_real.py::test_reading_helpers_on_edge_cases",
    "sudoku_long_answer_tail": T + "test_lm_graders_released.py::test_sudoku_cells_item_by_item",
    "value_clip_min": T + "test_control_flow.py::test_advantage_preparation_and_value_loss",
    "ckpt_prune_keeps_oldest": T + "test_infrastructure.py::test_checkpoint_round_trip_prune_and_refuse_nan",
    "metrics_resume_keeps_rows": T + "test_infrastructure.py::test_metrics_logger_resume_drops_rows_after_checkpoint",
    "run_folder_overwritten": T + "test_run_guards.py::"
                                  "test_a_run_killed_before_or_after_its_first_checkpoint_is_never_replaced_silently",
}


def run_mutant(mutant: Mutant, timeout: float, tests: list[str] | None = None) -> tuple[str, float, str]:
    """``(verdict, seconds, detail)`` for one mutant, run in a fresh copy of ``src`` against its
    test files (or ``tests`` instead)."""
    with tempfile.TemporaryDirectory(prefix="dipod-mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        target = src / "dipod" / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            return "error", 0.0, f"snippet found {text.count(mutant.old)} times in {mutant.path}"
        target.write_text(text.replace(mutant.old, mutant.new))
        # the evaluation data travels with the copied package (dipod/lm/data)
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *(tests or mutant.tests)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, f"no verdict within {timeout:.0f} s"
        seconds = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("FAILED") or line.startswith("ERROR")]
        if proc.returncode == 0:
            return "survived", seconds, ""
        if proc.returncode in (1, 2) and lines:
            return "caught", seconds, lines[0][:160]
        return "error", seconds, proc.stdout[-300:]


def baseline(tests: list[str], timeout: float) -> tuple[bool, str]:
    """The chosen test files on the unmutated tree: a mutant only counts as caught where they pass."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode == 0, "\n".join(failed) or proc.stdout[-500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these mutants (names from --list)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the fast check: {len(SMOKE_TESTS)} mutants, each against the one test that catches it")
    parser.add_argument("--tests", nargs="*", default=None,
                        help="run these test files for every chosen mutant instead of each mutant's own")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the unmutated run of the test files (which must pass for verdicts to mean anything)")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:38s} {m.path:22s} {m.why}")
        return 0
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; see --list")
    chosen = [m for m in MUTANTS if (args.only is None or m.name in args.only) and (not args.smoke or m.name in SMOKE_TESTS)]
    if args.smoke and not args.tests:
        chosen = [dataclasses.replace(m, tests=(SMOKE_TESTS[m.name],)) for m in chosen]
    if not args.no_baseline:
        files = sorted({t for m in chosen for t in (args.tests or m.tests)})
        ok, detail = baseline(files, 4 * args.timeout)
        if not ok:
            print(f"the unmutated tree fails these tests, so no verdict would mean anything:\n{detail}")
            return 2
        print(f"baseline: {len(files)} test files or tests pass on the unmutated tree", flush=True)
    print("| mutant | file | verdict | seconds | first failing test |\n|---|---|---|---|---|", flush=True)
    caught = 0
    for mutant in chosen:
        verdict, seconds, detail = run_mutant(mutant, args.timeout, args.tests)
        caught += verdict.startswith("caught")
        print(f"| {mutant.name} | {mutant.path} | {verdict} | {seconds:.0f} | {detail.replace('|', '/')} |", flush=True)
    print(f"\ncaught {caught} of {len(chosen)} ({100.0 * caught / max(len(chosen), 1):.0f}%)")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
