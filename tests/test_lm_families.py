"""dipod.lm.families on tiny hub-layout LLaDA and Dream checkpoints (random weights).

The default path loads the suite's own checkpoints (``hub_models``, tests/hub_layout.py) into our own
network; tests marked ``needs_hub_code`` pin the legacy path on ../shared/models' snapshots (their own
remote code, transformers 4.56-4.57). Pins: family detection and clear errors
before any compute; Dream's shifted logits and padding; LLaDA rows independent of the batch
(logits, greedy decoding, proxies); save and reload; activation checkpointing (same gradients,
lower peak memory); mask id sanity; LoRA targets.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from dipod.lm.families import FAMILIES, detect_family, get_family, without_padding  # noqa: E402
from dipod.lm.model import LoraSettings, build_tiny_model, load_masked_lm  # noqa: E402

from hub_snapshots import SNAPSHOTS, hub_code_loads, needs_hub_code, needs_snapshots  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def load(hub_models):
    """``load(family, **kwargs)``: the suite's tiny checkpoint of ``family`` through the default path."""
    return lambda family, **kwargs: load_masked_lm(hub_models[family], **kwargs)


def load_hub(family: str, **kwargs):
    """../shared/models' snapshot run by its own hub code (the legacy path)."""
    return load_masked_lm(SNAPSHOTS[family], trust_remote_code=True, **kwargs)


@pytest.fixture(scope="module")
def llada(load):
    return load("llada")


@pytest.fixture(scope="module")
def dream(load):
    return load("dream")


def left_padded(lm, texts):
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), lm.pad_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        attn[i, width - len(r):] = 1
    return ids, attn


TEXTS = ["12+34=", "7*8=56, ok", "9"]


# ------------------------------------------------------------------------------ detection and errors

def test_family_is_detected_from_config_and_ids_come_from_the_model(llada, dream, tmp_path):
    assert (llada.family.name, llada.mask_id, llada.eos_id, llada.pad_id) == ("llada", 120, 98, 98)
    assert (dream.family.name, dream.mask_id, dream.eos_id, dream.pad_id) == ("dream", 120, 97, 97)
    # End of turn: the token each chat template closes a turn with.
    assert llada.tokenizer.convert_ids_to_tokens(llada.eot_id) == "<|eot_id|>"
    assert dream.tokenizer.convert_ids_to_tokens(dream.eot_id) == "<|im_end|>"
    tiny = load_masked_lm(build_tiny_model(tmp_path / "tiny", hidden_size=16, num_layers=1, num_heads=2,
                                           intermediate_size=16, max_positions=32))
    assert tiny.family.name == "hf_masked_lm" and tiny.eot_id is None


def test_families_are_singletons_through_copies_and_pickles():
    import copy
    import pickle

    for family in FAMILIES.values():
        assert copy.deepcopy(family) is family and pickle.loads(pickle.dumps(family)) is family


def test_unknown_family_and_remote_code_off_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*not a known family.*--model_family hf_masked_lm"):
        detect_family({"model_type": "gpt2"}, "gpt2")
    moe = {"model_type": "llada_moe", "auto_map": {"AutoModel": "modeling_lladamoe.LLaDAMoEModelLM"}}
    with pytest.raises(ValueError, match=r"llada_moe.*own code.*not a known family"):
        detect_family(moe, "inclusionAI/LLaDA-MoE-7B-A1B-Instruct")
    with pytest.raises(ValueError, match=r"model_family='bert'.*choose one of"):
        get_family("bert")
    from dipod.config import ConfigError
    from dipod.lm.train_config import TrainConfig

    with pytest.raises(ConfigError, match="model_family='lada'"):
        TrainConfig(model_family="lada")


@pytest.mark.skipif(hub_code_loads(), reason="transformers 4.56-4.57 runs the hub code: no error to check")
def test_hub_code_on_transformers_5_names_the_versions_and_the_default_path(hub_models):
    with pytest.raises(ValueError, match=r"transformers 4.56-4.57 only \(installed: 5.*Drop --trust_remote_code"):
        load_masked_lm(hub_models["llada"], trust_remote_code=True)


@pytest.mark.parametrize("family,missing,hub_code", [
    ("llada", "modeling_llada.py", True), ("dream", "generation_utils.py", True),
    ("dream", "model.safetensors", False), ("llada", "tokenizer.json", False)])
def test_an_incomplete_snapshot_names_the_missing_file(tmp_path, hub_models, family, missing, hub_code):
    if hub_code and not hub_code_loads():
        pytest.skip("the hub code's files matter only where the hub code loads (transformers 4.56-4.57)")
    if hub_code and not SNAPSHOTS[family].is_dir():
        pytest.skip("a missing hub code file needs ../shared/models' snapshot, which carries the hub code")
    copy = tmp_path / family
    source = SNAPSHOTS[family] if hub_code else hub_models[family]
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(missing, "tokenizer_config.json")
                    if missing == "tokenizer.json" else shutil.ignore_patterns(missing))
    with pytest.raises(FileNotFoundError, match=rf"no .*{missing.split('.')[0]}.*download the whole repository"):
        load_masked_lm(copy, trust_remote_code=hub_code)


def test_mask_token_id_must_agree_with_the_model(load):
    assert load("llada", mask_token_id=120).mask_id == 120
    # LLaDA's tokenizer has no mask token: the id comes from config.json, and a wrong flag is an error.
    with pytest.raises(ValueError, match=r"--mask_token_id=126336 disagrees with the model's mask token id 120 "
                                         r"\(from its config.json\)"):
        load("llada", mask_token_id=126336)
    with pytest.raises(ValueError, match=r"--mask_token_id=5 .* 120 \(from its tokenizer and config.json\)"):
        load("dream", mask_token_id=5)


# ------------------------------------------------------------------------------ calling conventions

def test_dream_logits_are_realigned_so_position_i_predicts_token_i(dream):
    ids, attn = left_padded(dream, ["7*8=56, ok"])
    raw = dream.family.forward(dream.model, ids, attn)
    ours = dream.logits(ids, attn)
    assert torch.equal(ours[:, 1:], raw[:, :-1].float())  # Dream reads token i from output i - 1
    assert torch.equal(ours[:, 0], raw[:, 0].float())



@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_from_a_position_equal_the_full_logits_there_in_bfloat16(load, family):
    """``first`` (the completion's start) computes the vocabulary head and its float32 copy at those
    positions only, with the same numbers as slicing the full logits (Dream's shift included)."""
    lm = load(family, dtype="bfloat16")
    ids, attn = left_padded(lm, TEXTS)
    full = lm.logits(ids, attn)
    seen = []  # the rows of hidden states the head is applied to
    real = lm.model.head_logits
    lm.model.head_logits = lambda hidden: seen.append(hidden.shape[1]) or real(hidden)
    try:
        for first in (1, 4, ids.shape[1] - 2):
            part = lm.logits(ids, attn, first=first)
            assert part.dtype == torch.float32 and part.shape[1] == ids.shape[1] - first
            assert torch.equal(part, full[:, first:])
    finally:
        del lm.model.head_logits
    shift = 1 if family == "dream" else 0
    assert seen == [ids.shape[1] - first + shift for first in (1, 4, ids.shape[1] - 2)]


def test_dream_padding_is_masked_and_positions_restart(dream):
    ids, attn = left_padded(dream, TEXTS)
    batch = dream.logits(ids, attn)  # a 2-D long mask would crash Dream's SDPA attention
    assert torch.isfinite(batch).all()
    for i, text in enumerate(TEXTS):
        alone = dream.logits(*left_padded(dream, [text]))[0]
        n = alone.shape[0]
        # The first real token's (never used) prediction comes from a padding column; the rest match.
        torch.testing.assert_close(batch[i, ids.shape[1] - n + 1:], alone[1:], rtol=0, atol=1e-5)


def test_llada_rows_do_not_depend_on_the_batch(llada):
    ids, attn = left_padded(llada, TEXTS)
    batch = llada.logits(ids, attn)
    for i, text in enumerate(TEXTS):
        alone = llada.logits(*left_padded(llada, [text]))[0]
        # our network masks padding keys (positions shifted by the padding: float32 rounding only)
        torch.testing.assert_close(batch[i, -alone.shape[0]:], alone, rtol=0, atol=1e-5)
        assert not batch[i, :-alone.shape[0]].any()  # padding positions: zeros, never read


@needs_snapshots
@needs_hub_code
def test_llada_hub_code_rows_do_not_depend_on_the_batch():
    llada = load_hub("llada")
    ids, attn = left_padded(llada, TEXTS)
    batch = llada.logits(ids, attn)
    for i, text in enumerate(TEXTS):
        alone = llada.logits(*left_padded(llada, [text]))[0]
        assert torch.equal(batch[i, -alone.shape[0]:], alone)
    # The code really ignores attention_mask: without the family, padding leaks into the rows.
    leaky = llada.model(input_ids=ids, attention_mask=attn).logits
    assert (leaky[0, -len("12+34="):] - batch[0, -len("12+34="):]).abs().max() > 1e-3


def test_without_padding_groups_rows_and_keeps_gradients():
    weight = torch.randn(5, 3, requires_grad=True)
    calls = []

    def forward(ids):  # position-dependent, so stripping columns changes the result
        calls.append(tuple(ids.shape))
        return weight[ids] * torch.arange(1, ids.shape[1] + 1)[None, :, None]

    ids = torch.tensor([[0, 1, 2], [0, 3, 4], [2, 2, 2], [4, 4, 1]])
    attn = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    out = without_padding(forward, ids, attn)
    assert sorted(calls) == [(1, 1), (1, 3), (2, 2)]  # one forward per padding pattern
    for i in range(4):
        keep = attn[i].bool()
        assert torch.equal(out[i, keep], forward(ids[i:i + 1, keep])[0])
        assert not out[i, ~keep].any()
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_greedy_decoding_and_proxies_do_not_depend_on_the_batch(family, llada, dream):
    from dipod.lm.proxies import ProxySettings, compute_proxies
    from dipod.lm.sampler import SamplerSettings, generate

    lm = {"llada": llada, "dream": dream}[family]
    settings = SamplerSettings(gen_length=8, block_length=4, steps=4)
    ids, attn = left_padded(lm, TEXTS)
    batch = generate(lm, ids, attn, settings)
    for i, text in enumerate(TEXTS):
        assert torch.equal(batch[i], generate(lm, *left_padded(lm, [text]), settings)[0]), text
    # Proxies: the first prompt beside a longer one (so it is padded) or beside one of its own length.
    proxy = ProxySettings(num_draws=2, masking="random", block_length=4)
    long_ids, long_attn = left_padded(lm, [TEXTS[0], TEXTS[1]])
    short_ids, short_attn = left_padded(lm, [TEXTS[0], "56+1=?"])
    completions = batch[:2]
    padded = compute_proxies(lm, long_ids, long_attn, completions, proxy, seed=0)
    unpadded = compute_proxies(lm, short_ids, short_attn, completions, proxy, seed=0)
    tol = 1e-5
    torch.testing.assert_close(padded.elbo_nk[0], unpadded.elbo_nk[0], rtol=0, atol=tol)
    torch.testing.assert_close(padded.eubo_n[0], unpadded.eubo_n[0], rtol=0, atol=tol)


# ------------------------------------------------------------------------------ saving, LoRA, checkpointing

def saved_with_moved_adapters(path, out):
    """The model at ``path`` with LoRA adapters moved off zero (so the merge matters), saved to ``out``."""
    lm = load_masked_lm(path, lora=LoraSettings(r=2, alpha=4, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return lm, lm.save_pretrained(out)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_save_and_reload_give_the_same_logits(load, hub_models, family, tmp_path):
    lm, out = saved_with_moved_adapters(hub_models[family], tmp_path / "saved")
    ids, attn = left_padded(lm, TEXTS)
    before = lm.logits(ids, attn)
    again = load_masked_lm(out)
    assert again.family is lm.family and (again.mask_id, again.eos_id, again.eot_id) == (lm.mask_id, lm.eos_id,
                                                                                          lm.eot_id)
    # Merging W + scale * B A rounds differently from applying the adapter: float32 noise only.
    torch.testing.assert_close(again.logits(ids, attn), before, rtol=0, atol=1e-4)
    assert (before - load(family).logits(ids, attn)).abs().max() > 1e-3  # the adapters were saved
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


@needs_snapshots
@needs_hub_code
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_saved_snapshot_runs_on_its_hub_code_with_the_same_logits(family, tmp_path):
    """Saving keeps the source snapshot's hub code: that code loads the saved folder and computes our logits."""
    lm, out = saved_with_moved_adapters(SNAPSHOTS[family], tmp_path / "saved")
    ids, attn = left_padded(lm, TEXTS)
    hub, again = (load_masked_lm(out, trust_remote_code=remote) for remote in (True, False))
    torch.testing.assert_close(hub.logits(ids, attn), again.logits(ids, attn), rtol=0, atol=1e-5)


OUR_BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_default_lora_targets_cover_every_block_linear_but_not_the_head(load, family, targets):
    lm = load(family, lora=LoraSettings(r=2, target_modules=targets))
    adapted = {n.split(".lora_A")[0] for n, _ in lm.model.named_parameters() if ".lora_A." in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == OUR_BLOCK_LINEARS  # our module names, both families
    assert len(adapted) == 2 * len(OUR_BLOCK_LINEARS)  # two blocks
    assert not any(n.endswith("head") for n in adapted)


def test_lora_targets_take_llada_hub_names_and_unknown_ones_name_the_real_layers(load):
    lm = load("llada", lora=LoraSettings(r=2, target_modules="q_proj,attn_out,ff_proj"))  # hub-code names
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lm.model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "o_proj", "gate_proj"}
    with pytest.raises(ValueError, match=r"\['wq'\] match no linear layer.*'down_proj'.*'o_proj'"):
        load("llada", lora=LoraSettings(r=2, target_modules="q_proj,wq"))


@needs_snapshots
@needs_hub_code
def test_hub_code_lora_targets_name_the_hub_layers():
    lm = load_hub("llada", lora=LoraSettings(r=2))
    adapted = {n.split(".lora_A")[0] for n, _ in lm.model.named_parameters() if ".lora_A." in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj",
                                                       "up_proj", "ff_out"}
    assert not any(n.endswith("transformer.ff_out") for n in adapted)
    # Dream's (and the released code's) o_proj does not exist in LLaDA's hub code, whose output projection is attn_out.
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no linear layer.*'attn_out'"):
        load_hub("llada", lora=LoraSettings(r=2, target_modules="q_proj,o_proj"))


def peak_bytes_and_grads(path, checkpointing: bool, batch: int = 2, length: int = 128):
    """Peak CPU bytes allocated during one forward + backward (profiler memory events) and the gradients."""
    lm = load_masked_lm(path, gradient_checkpointing=checkpointing)
    lm.model.train()
    ids = torch.randint(0, 90, (batch, length), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = torch.nn.functional.cross_entropy(lm.logits(ids, attn).flatten(0, 1), ids.flatten())
            loss.backward()
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            totals = [e["args"]["Total Allocated"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    grads = {n: p.grad for n, p in lm.model.named_parameters()}
    return max(totals) - totals[0], grads


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_activation_checkpointing_keeps_gradients_and_lowers_peak_memory(hub_models, family):
    plain_peak, plain = peak_bytes_and_grads(hub_models[family], False)
    ckpt_peak, ckpt = peak_bytes_and_grads(hub_models[family], True)
    for name, grad in plain.items():
        assert torch.equal(ckpt[name], grad), name
    print(f"{family}: peak {plain_peak / 2**20:.2f} MiB -> {ckpt_peak / 2**20:.2f} MiB with checkpointing")
    assert ckpt_peak < 0.75 * plain_peak


def test_sampler_defaults_name_sampler_settings_fields():
    from dataclasses import fields

    from dipod.lm.sampler import SamplerSettings

    names = {f.name for f in fields(SamplerSettings)}
    for family in FAMILIES.values():
        assert set(family.sampler_defaults) <= names, (family.name, set(family.sampler_defaults) - names)


# ------------------------------------------------------------------------------ end of turn
def test_decoded_completion_ends_at_the_end_of_turn_token(llada):
    """LLaDA ends its turn with <|eot_id|> before EOS: text written after it never reaches a grader."""
    from dipod.lm.train_engine import decode_completions

    assert llada.eot_id is not None and llada.eot_id != llada.eos_id
    words = [llada.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("12", "34")]
    row = [*words[0], llada.eot_id, *words[1], llada.eos_id, *words[1]]
    no_eot = [*words[0], *words[1], llada.eos_id, *words[1], llada.eos_id]
    texts = decode_completions(llada, torch.tensor([row, no_eot]))
    assert texts == [llada.tokenizer.decode(words[0]), llada.tokenizer.decode(words[0] + words[1])]
