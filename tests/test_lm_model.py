"""dipod.lm.model: tiny model build/save/load round trip, LoRA, dtype, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from dipod.lm.model import (  # noqa: E402
    TINY_ALPHABET,
    LoraSettings,
    build_tiny_model,
    build_tiny_tokenizer,
    load_masked_lm,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64, max_positions=64, seed=3)


def _batch(lm, texts):
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_tokenizer_is_character_level_and_round_trips():
    tok = build_tiny_tokenizer()
    text = "Solve: 12+3*(4-5)/6 = x, y<z>.\nok Zz"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tok.decode(ids) == text
    assert [tok.pad_token_id, tok.mask_token_id, tok.eos_token_id] == [0, 1, 2]
    assert len(tok) == 4 + len(TINY_ALPHABET)
    assert tok.decode(tok("é")["input_ids"]) == "<unk>"


def test_save_load_round_trip_gives_same_logits(tiny_dir, tmp_path):
    lm = load_masked_lm(tiny_dir)
    assert (lm.mask_id, lm.pad_id, lm.eos_id) == (1, 0, 2)
    ids, attn = _batch(lm, ["12+3=15", "ab"])
    assert attn[1, 0] == 0  # left padding
    logits = lm.logits(ids, attn)
    assert logits.dtype == torch.float32 and logits.shape == (2, 7, len(lm.tokenizer))
    again = load_masked_lm(lm.save_pretrained(tmp_path / "copy"))
    assert torch.equal(again.logits(ids, attn), logits)


def test_tiny_model_is_bidirectional_and_ignores_padding(tiny_dir):
    lm = load_masked_lm(tiny_dir)
    ids, attn = _batch(lm, ["1234567", "abc"])
    base = lm.logits(ids, attn)
    later = ids.clone()
    later[:, -1] = lm.mask_id  # change the LAST token: earlier positions must see it
    assert (lm.logits(later, attn)[:, 0] - base[:, 0]).abs().max() > 1e-6
    repadded = ids.clone()
    repadded[1, :4] = 7  # content under attention mask 0 must not matter
    assert torch.allclose(lm.logits(repadded, attn)[1, 4:], base[1, 4:], atol=1e-6)


def test_mask_token_must_agree_and_bf16_gives_float32_logits(tiny_dir):
    lm = load_masked_lm(tiny_dir, dtype="bf16", mask_token_id=1)  # the tokenizer's own id: accepted
    assert lm.mask_id == 1
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    ids, attn = _batch(lm, ["42"])
    assert lm.logits(ids, attn).dtype == torch.float32
    # A different id would silently decode garbage: an error naming the flag and both values.
    with pytest.raises(ValueError, match=r"--mask_token_id=5 disagrees with the model's mask token id 1 "
                                         r"\(from its tokenizer\)"):
        load_masked_lm(tiny_dir, mask_token_id=5)
    with pytest.raises(ValueError, match="dtype"):
        load_masked_lm(tiny_dir, dtype="int8")


def test_lora_trains_only_adapters(tiny_dir):
    lm = load_masked_lm(tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    lm.model.train()
    opt = torch.optim.SGD([p for p in lm.model.parameters() if p.requires_grad], lr=0.5)
    ids, attn = _batch(lm, ["1+1=2", "3*3=9"])
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(lm.logits(ids, attn).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora_b = [p for n, p in lm.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # B starts at zero; training moved it
    for n, p in lm.model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


def test_lora_settings_validation():
    assert LoraSettings(target_modules="Wqkv, Wo").target_modules == ("Wqkv", "Wo")
    with pytest.raises(ValueError, match="r="):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)


def test_bad_paths_and_missing_mask_token_give_clear_errors(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_masked_lm(tmp_path / "nowhere")
    # "runs/missing" has the shape of a hub id, but its "org" is a local folder: no hub lookup.
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_masked_lm("runs/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_masked_lm(tmp_path / "empty")
    # Same model, but a tokenizer and config without any mask token.
    no_mask = tmp_path / "no_mask"
    load_masked_lm(tiny_dir).save_pretrained(no_mask)
    config = json.loads((no_mask / "tokenizer_config.json").read_text())
    config.pop("mask_token")
    (no_mask / "tokenizer_config.json").write_text(json.dumps(config))
    tok = json.loads((no_mask / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        added["special"] = added["content"] != "<mask>"
    (no_mask / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="--mask_token_id"):
        load_masked_lm(no_mask)
    assert load_masked_lm(no_mask, mask_token_id=1).mask_id == 1
    with pytest.raises(ValueError, match=r"mask_token_id=10000 is outside the vocabulary \[0, 100\)"):
        load_masked_lm(no_mask, mask_token_id=10_000)


def test_a_mask_id_one_past_the_vocabulary_is_refused_naming_where_it_came_from():
    """The last valid id is vocab - 1: id == vocab would index past the embedding (an IndexError later)."""
    from types import SimpleNamespace

    from dipod.lm.model import _resolve_mask_id

    nothing = SimpleNamespace()
    assert _resolve_mask_id("m", nothing, nothing, 99, vocab_size=100) == 99
    with pytest.raises(ValueError, match=r"mask_token_id=100 is outside the vocabulary \[0, 100\); fix --mask_token_id"):
        _resolve_mask_id("m", nothing, nothing, 100, vocab_size=100)
    with pytest.raises(ValueError, match=r"\[0, 100\); fix mask_token_id in the snapshot's config.json"):
        _resolve_mask_id("m", nothing, SimpleNamespace(mask_token_id=100), None, vocab_size=100)
    with pytest.raises(ValueError, match=r"mask_token_id=-1 is outside"):
        _resolve_mask_id("m", nothing, nothing, -1, vocab_size=100)


def test_a_tokenizer_from_another_model_is_warned_about_or_refused(hub_models, tmp_path):
    """LLaDA's weights with Dream's tokenizer: the same 128 ids, but the EOS moves 98 -> 97 (Dream's
    <|endoftext|>), so completions would end at LLaDA's <|startoftext|>. Warned, naming both; the model's
    own tokenizer loads in silence; a tokenizer larger than the embedding is refused."""
    import shutil
    import warnings

    from dipod.lm.snapshot import check_tokenizer_fits

    mixed = tmp_path / "llada-with-dream-tokenizer"
    shutil.copytree(hub_models["llada"], mixed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hub_models["dream"] / name, mixed / name)
    with pytest.warns(UserWarning, match=r"tokenizer's EOS '<\|endoftext\|>' \(id 97\) is not the EOS its config "
                                         r"names \(98\); is the tokenizer from another model\?"):
        lm = load_masked_lm(mixed)
    assert lm.eos_id == 97
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_masked_lm(hub_models["llada"]).eos_id == 98
    # an instruct model's end-of-turn EOS named by generation_config.json alone is its own
    generation = json.loads((mixed / "generation_config.json").read_text())
    (mixed / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [98, 97]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizer_fits(str(mixed), True, {"eos_token_id": 98}, lm.tokenizer, 128)
    with pytest.raises(ValueError, match="its tokenizer has 128 tokens but the model embeds only 127; the tokenizer "
                                         "is from another model"):
        check_tokenizer_fits(str(mixed), True, {}, lm.tokenizer, 127)
