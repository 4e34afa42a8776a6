"""LLaDA2.1's token editing in the block-causal decoder (``edit_threshold``, dipod.lm.processes.token_editing).

Pins:
- closed forms on tiny SDAR (blocks of 4) driven by a scripted forward whose proposals and their
  probabilities are set per step: an edit must happen (a changed proposal above the edit threshold),
  must not (below it; a prompt token of the shared block; a position still masked when the step began),
  the block's end (a mask-free step that edits nothing) and the ``max_post_steps`` cap, with the exact
  forward and edit counts and the reveal order untouched by edits;
- inert editing (a threshold no probability exceeds, no mask-free step) decodes bit-identically to no
  editing, forwards included; with edits, the prefix KV cache and row compaction change nothing, and a
  padded batch decodes as its rows alone;
- where a checkout of ZHZisZZ/dllm is named by ``DIPOD_DLLM_SRC``: token-identical to its LLaDA2.1
  sampler (``dllm/pipelines/llada21/sampler.py``, run on our network) on the tiny LLaDA2 snapshot, at
  its defaults (threshold 0.95, edit threshold 0.9) and at low thresholds where edits happen.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from block_models import llada2_snapshot, padded_batch, sdar_snapshot, tiny_snapshot  # noqa: E402, F401

from dipod.config import ConfigError  # noqa: E402
from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402

BLOCK = 4
A = 10  # token ids the scripted forward proposes (plain characters of both tokenizers)
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sdar(sdar_snapshot):
    return load_masked_lm(sdar_snapshot)


class ScriptedForward:
    """Block logits whose proposal at every position of the window is ``token(j)`` with probability ``prob(j)``
    (the rest spread evenly), ``j`` counting the window's forwards from 0."""

    def __init__(self, vocab: int, token, prob, compact: bool):
        self.vocab, self.token, self.prob = vocab, token, prob
        self.calls = self.j = 0
        if compact:
            self.keep_rows = lambda keep_b: None

    def __call__(self, x_bt, attn_bt, lo, hi, new_block):
        self.j = 0 if new_block else self.j + 1
        self.calls += 1
        p = self.prob(self.j)
        probs = torch.full((x_bt.shape[0], hi - lo, self.vocab), (1.0 - p) / (self.vocab - 1), dtype=torch.float64)
        probs[..., self.token(self.j)] = p
        return probs.log().float()


def _scripted(sdar, prompt_len: int, token, prob, *, compact: bool = True, **settings):
    """Decode one prompt of ``prompt_len`` tokens (4 generated) with the scripted forward."""
    ids = torch.arange(20, 20 + prompt_len)[None]
    forward = ScriptedForward(sdar.model.embed.weight.shape[0], token, prob, compact)
    base = dict(gen_length=BLOCK, block_length=BLOCK, steps=BLOCK, fill_after_eos=False, edit_threshold=0.9)
    out = decode(sdar, ids, torch.ones_like(ids), SamplerSettings(**{**base, **settings}), forward=forward)
    return out, forward


@pytest.mark.parametrize("compact", [True, False])
def test_a_confident_changed_proposal_is_edited_and_a_prompt_token_never(sdar, compact):
    # prompt of 2: the first window is [p p M M], the second [M M M M]; step 0 of a window reveals every
    # mask as A (0.99 > 0.95), step 1 proposes B at 0.95 > 0.9 everywhere: the generated tokens become B,
    # the prompt tokens stay; step 2 proposes B again: nothing changes, the window ends.
    out, forward = _scripted(sdar, 2, lambda j: A if j == 0 else A + 1, lambda j: 0.99 if j == 0 else 0.95,
                             compact=compact, confidence_threshold=0.95)
    assert out.completion_bg.tolist() == [[A + 1] * 4]
    assert out.forward_passes == forward.calls == 6  # 3 per window
    assert out.edits == 2 + 4  # the generated tokens of both windows (2 of the first are prompt)
    assert out.order_bg.tolist() == [[0, 0, 3, 3]]  # the reveal steps: edits do not move them


def test_an_unconfident_changed_proposal_is_not_edited(sdar):
    out, forward = _scripted(sdar, 2, lambda j: A if j == 0 else A + 1, lambda j: 0.99 if j == 0 else 0.85,
                             confidence_threshold=0.95)
    assert out.completion_bg.tolist() == [[A] * 4]
    assert out.edits == 0 and out.forward_passes == 4  # one reveal step and one mask-free step per window


def test_edits_while_masks_remain_and_the_block_end(sdar):
    # fixed schedule, one reveal per step; step j proposes A + min(j, 3) at 0.95 everywhere: each step reveals
    # the leftmost mask and edits every token revealed before it (not the one masked when the step began);
    # step 4 (mask-free) proposes A + 3 again: no edit, the block ends. The prompt fills its own block.
    out, forward = _scripted(sdar, 4, lambda j: A + min(j, 3), lambda j: 0.95)
    assert out.completion_bg.tolist() == [[A + 3] * 4]
    assert out.edits == 0 + 1 + 2 + 3 and out.forward_passes == 5
    assert out.order_bg.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("max_post_steps", [0, 1, 3])
def test_mask_free_steps_stop_at_max_post_steps(sdar, max_post_steps):
    # proposals flip between A and B at 0.95 forever: every mask-free step edits all 4, until the cap
    out, forward = _scripted(sdar, 4, lambda j: A + j % 2, lambda j: 0.95, confidence_threshold=0.9,
                             max_post_steps=max_post_steps)
    assert out.forward_passes == 1 + max_post_steps and out.edits == 4 * max_post_steps
    assert out.completion_bg.tolist() == [[A + max_post_steps % 2] * 4]


@pytest.mark.parametrize("family", ["sdar", "llada2_moe"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_inert_editing_is_bit_identical_to_no_editing(family, threshold, tmp_path_factory):
    lm = load_masked_lm(tiny_snapshot(family, tmp_path_factory))
    block = lm.model.spec.block_size
    ids, attn = padded_batch(5, 40, (0, 7, 13, 30), lm.pad_id)
    settings = dict(gen_length=2 * block, block_length=block, steps=2 * block, fill_after_eos=False,
                    confidence_threshold=threshold)
    plain = decode(lm, ids, attn, SamplerSettings(**settings))
    inert = decode(lm, ids, attn, SamplerSettings(**settings, edit_threshold=1.0, max_post_steps=0))
    assert torch.equal(plain.completion_bg, inert.completion_bg) and torch.equal(plain.order_bg, inert.order_bg)
    assert (plain.forward_passes, plain.row_forwards, plain.edits) == (inert.forward_passes, inert.row_forwards, 0)


@pytest.mark.parametrize("family", ["sdar", "llada2_moe"])
def test_editing_with_the_cache_without_compaction_and_per_row_is_the_same(family, tmp_path_factory):
    lm = load_masked_lm(tiny_snapshot(family, tmp_path_factory))
    block = lm.model.spec.block_size
    ids, attn = padded_batch(5, 40, (0, 7, 13, 30), lm.pad_id)
    settings = dict(gen_length=2 * block, block_length=block, steps=2 * block, fill_after_eos=False,
                    confidence_threshold=0.3, edit_threshold=0.2)
    plain = decode(lm, ids, attn, SamplerSettings(**settings))
    assert plain.edits > 0 and plain.forward_passes > decode(
        lm, ids, attn, SamplerSettings(**{**settings, "edit_threshold": None})).forward_passes
    for variant in (dict(kv_cache="prefix"), dict(compact_rows=False)):
        other = decode(lm, ids, attn, SamplerSettings(**settings, **variant))
        assert torch.equal(plain.completion_bg, other.completion_bg) and torch.equal(plain.order_bg, other.order_bg)
        assert (plain.forward_passes, plain.edits) == (other.forward_passes, other.edits)
    for n in range(ids.shape[0]):
        real = attn[n].bool()
        alone = decode(lm, ids[n:n + 1, real], attn[n:n + 1, real], SamplerSettings(**settings))
        assert torch.equal(alone.completion_bg, plain.completion_bg[n:n + 1])


def test_lm_eval_reports_the_edits_summed_over_its_batches(tmp_path_factory):
    # `dipod lm eval --json` carries `edits` beside the forwards: the batches' own counts, summed
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import encode_prompts

    lm = load_masked_lm(tiny_snapshot("sdar", tmp_path_factory))
    task = get_task("sudoku4")
    examples = task.load("test", limit=5)
    settings = SamplerSettings(gen_length=8, block_length=BLOCK, steps=8, fill_after_eos=False,
                               confidence_threshold=0.3, edit_threshold=0.2)
    report = evaluate_policy(lm, task, examples, settings, prompt_style="compact", max_prompt_length=48, batch_size=3)
    per_batch = []
    for chunk in (examples[:3], examples[3:]):
        ids, attn = encode_prompts(lm, [task.prompt(ex, "compact") for ex in chunk], 48, chat=False)
        per_batch.append(decode(lm, ids, attn, settings))
    assert report["edits"] == sum(d.edits for d in per_batch) > 0
    assert report["row_forwards"] == sum(d.row_forwards for d in per_batch)
    inert = evaluate_policy(lm, task, examples, dataclasses.replace(settings, edit_threshold=None),
                            prompt_style="compact", max_prompt_length=48, batch_size=3)
    assert inert["edits"] == 0


def test_bad_editing_settings_are_clear_errors(sdar):
    with pytest.raises(ConfigError, match="edit_threshold=1.5 must lie in"):
        SamplerSettings(edit_threshold=1.5)
    with pytest.raises(ConfigError, match="edit_threshold compares a probability"):
        SamplerSettings(edit_threshold=0.9, remasking="random")
    with pytest.raises(ConfigError, match="max_post_steps=-1"):
        SamplerSettings(max_post_steps=-1)
    with pytest.raises(ConfigError, match="stop_at_eos.*use one of them"):
        SamplerSettings(edit_threshold=0.9, stop_at_eos=True)


def test_editing_is_refused_for_a_full_sequence_model(tmp_path):
    from hub_layout import build_hub_layout

    lm = load_masked_lm(build_hub_layout("llada", tmp_path / "llada"))
    ids = torch.tensor([[20, 21, 22]])
    with pytest.raises(ConfigError, match="block-causal"):
        decode(lm, ids, torch.ones_like(ids), SamplerSettings(gen_length=8, block_length=8, steps=8,
                                                              edit_threshold=0.9))


# --- against ZHZisZZ/dllm's LLaDA2.1 sampler --------------------------------------------------------------------

DLLM_SRC = os.environ.get("DIPOD_DLLM_SRC")
SAMPLER_FILE = Path(DLLM_SRC or ".") / "dllm" / "pipelines" / "llada21" / "sampler.py"


def _reference_sampler_class():
    """``LLaDA21Sampler`` loaded from the checkout, its base classes stood in (the package's own base module
    imports the rest of dllm): a sampler holds ``model`` and ``tokenizer``; configs carry ``return_dict``."""

    @dataclass
    class BaseSamplerConfig:
        return_dict: bool = False

    @dataclass
    class BaseSampler:
        model: object
        tokenizer: object

    @dataclass
    class BaseSamplerOutput:
        sequences: torch.Tensor
        histories: list | None = None

    base = types.ModuleType("dllm.core.samplers.base")
    base.BaseSampler, base.BaseSamplerConfig, base.BaseSamplerOutput = BaseSampler, BaseSamplerConfig, BaseSamplerOutput
    saved = {name: sys.modules.get(name) for name in ("dllm", "dllm.core", "dllm.core.samplers", base.__name__)}
    for name in saved:
        sys.modules[name] = base if name == base.__name__ else types.ModuleType(name)
    try:
        spec = importlib.util.spec_from_file_location("dllm_llada21_sampler", SAMPLER_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.LLaDA21Sampler


class _OurNetworkForTheReference:
    """Our LLaDA2 network called as the reference sampler calls the hub model: its additive block mask (0 / -inf)
    and position ids as given; the mask token's logit at -inf, as ours with ``mask_in_confidence=false`` (the
    reference may propose the mask token; ours never does)."""

    device = torch.device("cpu")

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, x, attention_mask, position_ids):
        logits = self.lm.model(x, positions_bt=position_ids, mask=attention_mask == 0)
        logits[..., self.lm.mask_id] = float("-inf")
        return types.SimpleNamespace(logits=logits)


@pytest.mark.skipif(not SAMPLER_FILE.is_file(), reason="set DIPOD_DLLM_SRC to a checkout of github.com/ZHZisZZ/dllm "
                    "(its dllm/pipelines/llada21/sampler.py is the reference)")
@pytest.mark.parametrize("threshold, edit_threshold", [(0.95, 0.9), (0.5, 0.3)])
def test_token_identical_to_the_dllm_llada21_sampler(llada2_snapshot, threshold, edit_threshold):
    lm = load_masked_lm(llada2_snapshot)
    block, gen = 32, 64
    ids, attn = padded_batch(2, 40, (0, 9, 30), lm.pad_id)
    ours = decode(lm, ids, attn, SamplerSettings(gen_length=gen, block_length=block, steps=gen, fill_after_eos=False,
                                                 confidence_threshold=threshold, edit_threshold=edit_threshold,
                                                 mask_in_confidence=False))
    if threshold < 0.9:
        assert ours.edits > 0  # the comparison covers edits
    tokenizer = types.SimpleNamespace(mask_token_id=lm.mask_id, eos_token_id=lm.eos_id)
    reference = _reference_sampler_class()(model=_OurNetworkForTheReference(lm), tokenizer=tokenizer)
    for n in range(ids.shape[0]):
        prompt = ids[n, attn[n].bool()]
        with torch.no_grad():
            theirs = reference.sample([prompt], block_size=block, max_new_tokens=gen, threshold=threshold,
                                      editing_threshold=edit_threshold)
        assert torch.equal(theirs[0, len(prompt):len(prompt) + gen], ours.completion_bg[n])
