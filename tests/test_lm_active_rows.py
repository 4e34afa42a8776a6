"""Per-row cost: finished rows leave the forwards (``dipod.lm.active_rows``), and nothing else changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dipod.lm.model import load_masked_lm
from dipod.lm.networks import make_cached_forward
from dipod.lm.reference import SHIPPED_DIR
from dipod.lm.sampler import SamplerSettings, decode

from block_models import padded_batch, sdar_snapshot  # noqa: F401  (the tiny SDAR fixture)


@pytest.fixture(scope="module")
def tiny_lm():
    # the shipped sudoku4 reference policy: trained, so its rows pass a threshold after different numbers
    # of steps, and it computes the same under transformers 4.x and 5.x
    return load_masked_lm(SHIPPED_DIR / "sudoku4")


def prompts(lm, batch: int = 6, seed: int = 0):
    """Sudoku prompts from the paper's test set; every other row shortened by 2 tokens and left-padded."""
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import encode_prompts

    task = get_task("sudoku4")
    examples = task.load("spg_test", limit=batch * (seed + 1))[batch * seed:]
    ids, attn = encode_prompts(lm, [task.prompt(ex, "compact") for ex in examples], 256, chat=False)
    ids[1::2, :2], attn[1::2, :2] = lm.pad_id, 0
    return ids, attn


def steps_per_row_and_block(order_bg: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """long [B]: the forwards each row took part in, had it left every block once it was decoded."""
    return sum(torch.tensor([torch.unique(row).numel() for row in order_bg[:, lo:hi]]) for lo, hi in blocks)


THRESHOLD_CASES = [
    dict(schedule="blocks", block_length=4, temperature=0.0),
    dict(schedule="blocks", block_length=8, temperature=0.8),
    dict(schedule="global", block_length=16, temperature=0.0, remasking="topk_margin"),
    dict(schedule="global", block_length=16, temperature=1.0, remasking="maskgit_plus", top_k=20),
]


@pytest.mark.parametrize("kv_cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("case", THRESHOLD_CASES, ids=lambda c: f"{c['schedule']}{c['block_length']}_T{c['temperature']}")
def test_compacted_threshold_decoding_is_bit_identical_and_pays_per_row(tiny_lm, case, kv_cache):
    ids, attn = prompts(tiny_lm)
    settings = SamplerSettings(gen_length=16, steps=16, confidence_threshold=0.7, kv_cache=kv_cache,
                               fill_after_eos=False, **case)
    full = decode(tiny_lm, ids, attn, dataclasses.replace(settings, compact_rows=False),
                  generator=torch.Generator().manual_seed(5))
    compact = decode(tiny_lm, ids, attn, settings, generator=torch.Generator().manual_seed(5))
    assert torch.equal(compact.completion_bg, full.completion_bg)
    assert torch.equal(compact.order_bg, full.order_bg)
    assert compact.forward_passes == full.forward_passes
    assert full.row_forwards == ids.shape[0] * full.forward_passes
    per_row = steps_per_row_and_block(compact.order_bg, settings.resolved().blocks())
    assert compact.row_forwards == int(per_row.sum())
    assert compact.row_forwards < full.row_forwards  # the rows really finished at different times


def test_forwards_see_only_the_rows_with_masks_left_and_the_cache_follows(tiny_lm):
    ids, attn = prompts(tiny_lm, seed=1)
    settings = SamplerSettings(gen_length=16, block_length=8, steps=16, confidence_threshold=0.7, kv_cache="dual",
                               fill_after_eos=False)
    cached = make_cached_forward(tiny_lm, "dual")
    seen = []

    def recording(x_bt, attn_bt, lo, hi, new_block):
        seen.append((x_bt.shape[0], int((x_bt[:, lo:hi] == tiny_lm.mask_id).any(dim=1).sum()), new_block))
        return cached(x_bt, attn_bt, lo, hi, new_block)

    recording.keep_rows = cached.keep_rows
    out = decode(tiny_lm, ids, attn, settings, forward=recording)
    assert all(rows == with_masks for rows, with_masks, _ in seen)  # never a finished row
    assert [rows for rows, _, first in seen if first] == [ids.shape[0]] * 2  # each block starts with every row
    assert sum(rows for rows, _, _ in seen) == out.row_forwards
    assert torch.equal(out.completion_bg, decode(tiny_lm, ids, attn, settings).completion_bg)


def test_a_batch_costs_the_sum_of_its_rows_decoded_alone(tiny_lm):
    ids, attn = prompts(tiny_lm, seed=2)
    settings = SamplerSettings(gen_length=16, block_length=8, steps=16, confidence_threshold=0.7)
    batch = decode(tiny_lm, ids, attn, settings)
    alone = [decode(tiny_lm, ids[i:i + 1, attn[i] == 1], attn[i:i + 1, attn[i] == 1], settings)
             for i in range(ids.shape[0])]
    assert batch.row_forwards == sum(a.forward_passes for a in alone)
    assert torch.equal(batch.completion_bg, torch.cat([a.completion_bg for a in alone]))


@pytest.mark.parametrize("schedule, steps", [("blocks", 8), ("global", 5)])
def test_fixed_schedules_keep_every_row_to_the_end(tiny_lm, schedule, steps):
    # every row reveals the same count per step, so no row finishes early: nothing to compact
    ids, attn = prompts(tiny_lm, seed=3)
    settings = SamplerSettings(gen_length=16, block_length=8, steps=steps, schedule=schedule)
    out = decode(tiny_lm, ids, attn, settings)
    assert out.forward_passes == steps and out.row_forwards == ids.shape[0] * steps
    assert torch.equal(out.completion_bg,
                       decode(tiny_lm, ids, attn, dataclasses.replace(settings, compact_rows=False)).completion_bg)


def test_keep_rows_before_a_cached_block_is_a_clear_error(tiny_lm):
    with pytest.raises(RuntimeError, match="keep_rows before any block was cached"):
        make_cached_forward(tiny_lm, "prefix").keep_rows(torch.tensor([True]))


# ---- stop_at_eos: a row whose completion has ended leaves the forwards for good ----

@pytest.fixture(scope="module")
def countdown_lm():
    # the shipped countdown reference answers in ~8 tokens and EOS-pads its 16: rows end in different blocks
    return load_masked_lm(SHIPPED_DIR / "countdown")


def countdown_prompts(lm, batch: int = 6):
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import encode_prompts

    task = get_task("countdown")
    ids, attn = encode_prompts(lm, [task.prompt(ex, "compact") for ex in task.load("test", limit=batch)], 256,
                               chat=False)
    return ids, attn


def end_steps(completion_bg: torch.Tensor, order_bg: torch.Tensor, eos_id: int) -> torch.Tensor:
    """long [B]: the step after which each row's raw decode has an EOS with every position before it revealed
    (a large number where it never has): the earliest, over its EOS positions p, of max(order[:p + 1])."""
    revealed_by_bg = order_bg.cummax(dim=1).values
    never = torch.iinfo(torch.long).max
    return revealed_by_bg.masked_fill(completion_bg != eos_id, never).amin(dim=1)


STOP_CASES = [
    dict(block_length=4, steps=16),  # the fixed schedule: later blocks are skipped
    dict(block_length=4, steps=16, confidence_threshold=0.7),
    dict(block_length=8, steps=16, confidence_threshold=0.7, kv_cache="dual"),
    dict(block_length=8, steps=8, kv_cache="prefix"),
]


@pytest.mark.parametrize("case", STOP_CASES, ids=lambda c: "_".join(f"{k}{v}" for k, v in c.items()))
def test_stop_at_eos_keeps_the_completions_and_pays_only_until_each_row_ends(countdown_lm, case):
    lm = countdown_lm
    ids, attn = countdown_prompts(lm)
    raw = SamplerSettings(gen_length=16, fill_after_eos=False, **case)
    on = decode(lm, ids, attn, raw)
    stopped = decode(lm, ids, attn, dataclasses.replace(raw, stop_at_eos=True))
    end_b = end_steps(on.completion_bg, on.order_bg, lm.eos_id)
    assert bool((end_b < on.forward_passes - 1).any())  # some row really ends before the decode does
    decoded_bg = on.order_bg <= end_b[:, None]
    # the tokens revealed until a row ends are kept; everything after is EOS, revealed by no step (order -1)
    assert torch.equal(stopped.completion_bg, on.completion_bg.masked_fill(~decoded_bg, lm.eos_id))
    assert torch.equal(stopped.order_bg, on.order_bg.masked_fill(~decoded_bg, -1))
    # a row takes part in one forward per step it revealed at, up to the step it ended at
    per_row = torch.tensor([torch.unique(row[row >= 0]).numel() for row in stopped.order_bg])
    assert stopped.row_forwards == int(per_row.sum()) < on.row_forwards
    # in the canonical (EOS-filled) form nothing changes
    filled = dataclasses.replace(raw, fill_after_eos=True)
    assert torch.equal(decode(lm, ids, attn, dataclasses.replace(filled, stop_at_eos=True)).completion_bg,
                       decode(lm, ids, attn, filled).completion_bg)


# global: this policy writes the EOS tail first and its answer last, so its rows end only at the last step
@pytest.mark.parametrize("schedule, saves", [("blocks", True), ("global", False)])
def test_stop_at_eos_sampling_with_a_fixed_schedule_draws_the_same_noise(countdown_lm, schedule, saves):
    # every row that has not ended needs every step of its block, so the noise stream is drawn as without
    # stopping and the sampled completions are the same too (threshold decoding has no such guarantee)
    ids, attn = countdown_prompts(countdown_lm)
    settings = SamplerSettings(gen_length=16, block_length=4, steps=16, temperature=1.0, schedule=schedule)
    on = decode(countdown_lm, ids, attn, settings, generator=torch.Generator().manual_seed(3))
    stopped = decode(countdown_lm, ids, attn, dataclasses.replace(settings, stop_at_eos=True),
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(stopped.completion_bg, on.completion_bg)
    assert (stopped.row_forwards < on.row_forwards) == saves and stopped.row_forwards <= on.row_forwards


def test_stop_at_eos_without_compaction_stops_only_when_every_row_has_ended(countdown_lm):
    ids, attn = countdown_prompts(countdown_lm)
    settings = SamplerSettings(gen_length=16, block_length=4, steps=16, fill_after_eos=False, compact_rows=False)
    on = decode(countdown_lm, ids, attn, settings)
    stopped = decode(countdown_lm, ids, attn, dataclasses.replace(settings, stop_at_eos=True))
    last_end = int(end_steps(on.completion_bg, on.order_bg, countdown_lm.eos_id).max())
    blocks_left = 3 - last_end // 4  # blocks of 4 steps; the block the last row ends in runs to its end
    assert stopped.forward_passes == on.forward_passes - 4 * blocks_left
    assert stopped.row_forwards == ids.shape[0] * stopped.forward_passes


def test_stop_at_eos_ignores_an_eos_among_the_prompt_tokens_of_a_block_causal_canvas(sdar_snapshot):
    # the block-causal canvas starts with the prompt's last block: an EOS there was not revealed by decoding,
    # so a row stops only at an EOS it decoded itself (random weights may decode one: that row may stop there)
    lm = load_masked_lm(sdar_snapshot)
    ids, attn = padded_batch(0, 9, (0, 2, 5), pad_id=lm.pad_id)
    ids[:, -1] = lm.eos_id  # every prompt ends with EOS, inside the canvas's first window
    settings = SamplerSettings(gen_length=8, block_length=4, steps=8, fill_after_eos=False)
    on = decode(lm, ids, attn, settings)
    never = torch.iinfo(torch.long).max
    end_b = end_steps(on.completion_bg, on.order_bg, lm.eos_id)
    assert bool((end_b == never).any())  # some row decodes no EOS: the prompt's EOS alone must not stop it
    stopped = decode(lm, ids, attn, dataclasses.replace(settings, stop_at_eos=True))
    decoded_bg = on.order_bg <= end_b[:, None]
    assert torch.equal(stopped.completion_bg, on.completion_bg.masked_fill(~decoded_bg, lm.eos_id))
    runs_every_step = end_b == never
    assert torch.equal(stopped.order_bg[runs_every_step], on.order_bg[runs_every_step])
    assert stopped.row_forwards <= on.row_forwards
    if bool(runs_every_step.all()):
        assert stopped.row_forwards == on.row_forwards
