"""LLaDA and Dream from their checkpoint files into our own network (dipod.lm.networks.checkpoint_model).

Pins: the logits of the default load equal the hub code's (recorded on transformers 4.57.6 in
../shared/models/hub_code_logits_4.57.pt, for its snapshots: skipped where ../shared is absent) to 1e-5
in float32, padding rows included; on the suite's own hub-layout checkpoints (``hub_models``): a checkpoint
whose tensors do not fit the config is an error naming the tensor, raised before any weight is
read; an unknown architecture names the supported families.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from hub_snapshots import HUB_LOGITS, SNAPSHOTS, needs_snapshots  # noqa: E402

from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.networks.checkpoint_model import CheckpointNetwork, load_checkpoint_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@needs_snapshots
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_equal_the_hub_codes_recorded_logits_padding_included(family):
    if not HUB_LOGITS.is_file():
        pytest.skip(f"{HUB_LOGITS} (the hub code's logits for ../shared/models' snapshots) is absent")
    recorded = torch.load(HUB_LOGITS)[SNAPSHOTS[family].name]
    lm = load_masked_lm(SNAPSHOTS[family])
    assert isinstance(lm.model, CheckpointNetwork) and recorded["attn"][1, 0] == 0  # row 1 is left-padded
    with torch.no_grad():
        ours = lm.logits(recorded["ids"], recorded["attn"])
    assert recorded["logits"].abs().max() > 1.0
    torch.testing.assert_close(ours, recorded["logits"], rtol=0, atol=1e-5)


def _copy_with(source, tmp_path, edit):
    """A copy of the checkpoint at ``source`` whose tensors ``edit`` changed (a dict name -> tensor, in place)."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), r"missing tensor model\.layers\.1\.self_attn\.k_proj\.bias"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)}),
     r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(100, 64)}),
     r"lm_head\.weight has shape \[100, 64\], config\.json implies \[128, 64\]"),
])
def test_weights_that_do_not_fit_name_the_tensor_before_any_is_read(hub_models, tmp_path, monkeypatch, edit,
                                                                     message):
    import safetensors.torch

    copy = _copy_with(hub_models["dream"], tmp_path, edit)
    read = []
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: read.append(a) or {})
    with pytest.raises(ValueError, match=message):
        load_masked_lm(copy)
    assert read == []  # the headers were checked; no weight was loaded


def test_an_unknown_architecture_names_the_supported_families(hub_models, tmp_path):
    copy = tmp_path / "llada"
    shutil.copytree(hub_models["llada"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llada_moe"}))
    with pytest.raises(ValueError, match=r"llada_moe.*not a known family.*\['diffusion_gemma', 'dream', .*'llada'"):
        load_masked_lm(copy)
    with pytest.raises(ValueError, match=r"model_type='llada_moe' has no network in dipod; supported families: "
                                         r"\['dream', 'llada', 'llada2_moe', 'sdar', 'sdar_moe'\]"):
        load_checkpoint_model(copy)


def test_an_unsupported_variant_is_refused_by_name(hub_models, tmp_path):
    copy = tmp_path / "llada"
    shutil.copytree(hub_models["llada"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(ValueError, match=r"LLaDA config rope=True is not supported.*alibi false"):
        load_masked_lm(copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saving_writes_the_hub_format_back_exactly(hub_models, tmp_path, dtype):
    from safetensors.torch import load_file

    source = tmp_path / "source"
    shutil.copytree(hub_models["llada"], source)
    hub_code = "# a hub snapshot's model code: copied verbatim, never run by dipod\n"
    (source / "modeling_llada.py").write_text(hub_code)
    model = load_checkpoint_model(source, dtype)
    model.save_pretrained(tmp_path / "out")
    saved, original = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(
        str(source / "model.safetensors"))
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert saved[name].dtype == dtype and torch.equal(saved[name], tensor.to(dtype)), name
    # the hub code and the generation config travel with it
    assert (tmp_path / "out" / "modeling_llada.py").read_text() == hub_code
    assert (tmp_path / "out" / "generation_config.json").read_text() == (source / "generation_config.json").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text())
