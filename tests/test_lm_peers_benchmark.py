"""benchmarks/lm_peers.py: token agreement, the fastest-repeat ratios, the report, and the comparisons' plumbing
on the suite's tiny LLaDA checkpoint.

The peers' code is never part of dipod. Without it, the comparisons run against stand-ins with the peers'
signatures (LLaDA's ``generate()`` as the sampler tests transcribe it; our own dual-cache decode in the shape
``generate_with_dual_cache`` returns). With checkouts named by ``DIPOD_LLADA_REPO`` (ML-GSAI/LLaDA) and
``DIPOD_FAST_DLLM_REPO`` (NVlabs/Fast-dLLM), the real peers run too; those tests skip otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm_peers  # noqa: E402

from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402

ARGS = SimpleNamespace(gen_length=16, block_length=8, steps=16, threshold=0.9, repeats=2)


def test_compare_alternates_takes_each_sides_fastest_repeat_and_counts_agreement(monkeypatch):
    ours_bg = torch.arange(24).reshape(4, 6)
    peer_bg = ours_bg.clone()
    peer_bg[1, 2], peer_bg[3, 0], peer_bg[3, 5] = -1, -1, -1  # 3 of 24 tokens, 2 of 4 rows differ
    calls, clock = [], iter([(4.0, 5.0), (6.0, 9.0), (2.0, 3.0), (8.0, 7.0)])  # ours, peer, ours, peer

    def timed(fn):
        calls.append(fn.__name__)
        return (fn(), *next(clock))

    def ours():
        return ours_bg

    def peer():
        return peer_bg

    monkeypatch.setattr(lm_peers, "timed", timed)
    result = lm_peers.compare(ours, peer, repeats=2)
    assert calls == ["ours", "peer", "ours", "peer"]
    assert result == {"cpu_ratio_peer_over_ours": 3.0, "wall_ratio_peer_over_ours": round(7.0 / 3.0, 3),
                      "ours_cpu_s": 2.0, "peer_cpu_s": 6.0, "same_tokens": round(21 / 24, 4), "same_rows": "2 of 4"}


def test_timed_measures_process_and_wall_time_of_one_call():
    out, cpu, wall = lm_peers.timed(lambda: sum(i * i for i in range(200_000)))
    assert out == sum(i * i for i in range(200_000)) and 0.0 < cpu and 0.0 < wall


def test_the_report_has_one_row_per_comparison():
    same = {"cpu_ratio_peer_over_ours": 1.5, "wall_ratio_peer_over_ours": 1.25, "same_tokens": 1.0,
            "same_rows": "2 of 2"}
    result = {"command": "python benchmarks/lm_peers.py", "machine": "m", "started": "t", "model": "tiny",
              "decoding": {"gen_length": 16},
              "parts": [{"peer": "LLaDA", "rows": 2, **same},
                        {"peer": "Fast", "rows": 2, "one_at_a_time": same, "ours_batched": {**same, "same_rows": "1 of 2"}}]}
    table = [line for line in lm_peers.markdown(result).splitlines() if line.startswith("| ")][1:]
    assert table == ["| LLaDA  (2 prompts) | 1.5 | 1.25 | 1.0 | 2 of 2 |",
                     "| Fast one at a time (2 prompts) | 1.5 | 1.25 | 1.0 | 2 of 2 |",
                     "| Fast ours batched (2 prompts) | 1.5 | 1.25 | 1.0 | 1 of 2 |"]


def test_a_missing_peer_checkout_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="generate.py not found: pass a checkout of the peer's public repository"):
        lm_peers.load_module(tmp_path / "generate.py", "absent_peer")


@pytest.fixture(scope="module")
def llada(hub_models):
    return load_masked_lm(str(hub_models["llada"]))


def prompts(batch: int = 3, width: int = 6) -> torch.Tensor:
    return torch.randint(0, 90, (batch, width), generator=torch.Generator().manual_seed(0))


class LogitsOutput(torch.nn.Module):
    """Our network with the hub code's call shape: ``model(x, attention_mask=None).logits`` and ``.device``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, x, attention_mask=None):
        return SimpleNamespace(logits=self.lm.logits(x, torch.ones_like(x)))


def test_llada_comparison_agrees_token_for_token_with_generates_transcription(llada):
    from test_lm_sampler import llada_generate_oracle

    def generate(model, prompt, steps, gen_length, block_length, mask_id):  # generate()'s signature and result
        return torch.cat([prompt, llada_generate_oracle(model, prompt, mask_id, gen_length, block_length, steps)], 1)

    part = lm_peers.llada_comparison(llada, generate, LogitsOutput(llada), prompts(), ARGS)
    assert (part["rows"], part["same_tokens"], part["same_rows"]) == (3, 1.0, "3 of 3")


def test_llada_comparison_reports_the_agreement_the_two_outputs_have(llada):
    ids = prompts(batch=4)

    def generate(model, prompt, steps, gen_length, block_length, mask_id):
        return torch.cat([prompt, torch.full((prompt.shape[0], gen_length), 5)], 1)  # every token 5

    part = lm_peers.llada_comparison(llada, generate, None, ids, ARGS)
    ours = decode(llada, ids, torch.ones_like(ids), SamplerSettings(gen_length=16, block_length=8, steps=16,
                                                                  fill_after_eos=False)).completion_bg
    assert part["same_tokens"] == round((ours == 5).float().mean().item(), 4)
    assert part["same_rows"] == f"{int((ours == 5).all(dim=1).sum())} of 4"


def test_fast_dllm_comparison_runs_the_peer_one_prompt_at_a_time(llada):
    seen = []

    def generate_with_dual_cache(model, prompt, steps, gen_length, block_length, mask_id, threshold):
        seen.append(prompt.shape[0])
        settings = SamplerSettings(gen_length=gen_length, block_length=block_length, steps=steps, kv_cache="dual",
                                   confidence_threshold=threshold, fill_after_eos=False)
        out = decode(model, prompt, torch.ones_like(prompt), settings)
        return torch.cat([prompt, out.completion_bg], 1), out.forward_passes

    part = lm_peers.fast_dllm_comparison(llada, generate_with_dual_cache, llada, prompts(), ARGS)
    assert seen == [1] * 3 * ARGS.repeats * 2  # one prompt per call, in both comparisons
    for case in ("one_at_a_time", "ours_batched"):
        assert (part[case]["same_tokens"], part[case]["same_rows"]) == (1.0, "3 of 3")


def peer_checkout(variable: str, inside: str) -> Path:
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"{variable} is unset: point it at a checkout of the peer's public code to compare with it")
    if not (Path(path) / inside).is_file():
        pytest.skip(f"{variable}={path} holds no {inside}")
    return Path(path)


def test_llada_generate_itself_agrees_token_for_token(llada):
    peer = lm_peers.load_module(peer_checkout("DIPOD_LLADA_REPO", "generate.py") / "generate.py", "llada_peer")
    part = lm_peers.llada_comparison(llada, peer.generate, LogitsOutput(llada), prompts(), ARGS)
    assert (part["same_tokens"], part["same_rows"]) == (1.0, "3 of 3")


@pytest.mark.parametrize("block_length, steps", [(4, 8), (8, 8), (16, 16)])
def test_llada_generate_itself_gives_each_row_of_our_padded_batch(llada, block_length, steps):
    # generate() attends to padding, so its reference for a padded batch is each row alone without it
    from test_lm_sampler import left_padded_prompts

    peer = lm_peers.load_module(peer_checkout("DIPOD_LLADA_REPO", "generate.py") / "generate.py", "llada_peer")
    ids, attn = left_padded_prompts(llada, 4, 7, seed=block_length)
    settings = SamplerSettings(gen_length=16, block_length=block_length, steps=steps, fill_after_eos=False)
    ours = decode(llada, ids, attn, settings).completion_bg
    for row in range(ids.shape[0]):
        prompt = ids[row:row + 1, attn[row] == 1]
        theirs = peer.generate(LogitsOutput(llada), prompt, steps=steps, gen_length=16, block_length=block_length,
                               mask_id=llada.mask_id)[:, prompt.shape[1]:]
        assert torch.equal(ours[row:row + 1], theirs), row


def test_fast_dllm_dual_cache_itself_agrees_token_for_token(hub_models):
    from hub_snapshots import hub_code_loads

    root = peer_checkout("DIPOD_FAST_DLLM_REPO", "llada/generate.py")
    if not hub_code_loads():
        pytest.skip("Fast-dLLM's LLaDA model class (LLaDA's hub code) loads on transformers 4.56-4.57 only")
    args = SimpleNamespace(**vars(ARGS), fast_dllm_repo=str(root), model=str(hub_models["llada"]))
    part = lm_peers.fast_dllm_part(args, prompts())
    for case in ("one_at_a_time", "ours_batched"):
        assert (part[case]["same_tokens"], part[case]["same_rows"]) == (1.0, "3 of 3")
