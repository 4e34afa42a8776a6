"""SDAR-MoE (``SDARMoeForCausalLM``, SDAR-30B-A3B) in our own network (dipod.lm.networks.sdar / moe).

Pins, on a tiny hub-layout SDAR-MoE built here (tests/hub_layout.py: the hub's tensor names written from
Qwen3-MoE's module layout; 3 layers, the middle one dense through ``mlp_only_layers``, 4 experts, top-2):
- the routing by hand on a 2-expert toy (softmax over the experts, top-k, renormalised or not);
- the dense limit: one expert routed top-1 computes exactly the dense SDAR network holding that expert as
  its MLP (logits and decoding identical);
- parity with the public modeling code of the architecture SDAR-MoE is built on, transformers' own
  Qwen3-MoE (installed with transformers), given the same block-causal mask and positions: logits to 1e-5
  in float32, a left-padded row included. SDAR-MoE's own hub code (``modeling_sdar_moe.py``) is not
  public outside the model's hub repository, so no test runs it;
- the family (detected from ``model_type``, block-causal process), LoRA over attention, the dense MLP and
  every expert's projections (never the router), a padded batch decoding as its rows alone, the prefix
  KV cache token-identical.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from block_models import padded_batch  # noqa: E402
from hub_layout import build_hub_layout  # noqa: E402

from dipod.lm.model import LoraSettings, load_masked_lm  # noqa: E402
from dipod.lm.networks.moe import GatedMLP, MoE, MoESpec, make_router  # noqa: E402
from dipod.lm.networks.transformer import block_causal_mask, row_positions  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402

BLOCK = 4
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return build_hub_layout("sdar_moe", tmp_path_factory.mktemp("sdar_moe"))


@pytest.fixture(scope="module")
def lm(snapshot):
    return load_masked_lm(snapshot)


def _expert(d: int, seed: int) -> GatedMLP:
    torch.manual_seed(seed)
    return GatedMLP(nn.Linear(d, 3, bias=False), nn.Linear(d, 3, bias=False), nn.Linear(3, d, bias=False))


@pytest.mark.parametrize("top_k, norm", [(1, True), (1, False), (2, True), (2, False)])
def test_two_expert_routing_by_hand(top_k, norm):
    d = 2
    router = make_router(MoESpec(num_experts=2, top_k=top_k, score="softmax", norm_topk_prob=norm), d)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # logits (x0, 2 x1)
    experts = [_expert(d, 0), _expert(d, 1)]
    moe = MoE(router, experts, None)
    x = torch.tensor([[0.3, -0.4], [1.0, 1.0], [-2.0, 0.5]])
    expected = []
    for token in x:
        l0, l1 = float(token[0]), 2.0 * float(token[1])
        p0 = 1.0 / (1.0 + torch.exp(torch.tensor(l1 - l0)))  # softmax over two logits
        p = [p0, 1.0 - p0]
        best = 0 if p[0] >= p[1] else 1
        out = [e(token) for e in experts]
        if top_k == 2:  # both chosen; the probabilities already sum to 1
            expected.append(p[0] * out[0] + p[1] * out[1])
        else:
            expected.append((1.0 if norm else p[best]) * out[best])
    torch.testing.assert_close(moe(x), torch.stack(expected), rtol=0, atol=1e-6)


def test_one_expert_top_1_is_the_dense_sdar_network(tmp_path):
    moe_dir = build_hub_layout("sdar_moe", tmp_path / "moe", seed=3, num_experts=1, num_experts_per_tok=1,
                               moe_intermediate_size=128, mlp_only_layers=[])
    from safetensors.torch import load_file, save_file

    dense_dir = tmp_path / "dense"
    shutil.copytree(moe_dir, dense_dir)
    config = json.loads((moe_dir / "config.json").read_text())
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers",
                "decoder_sparse_step", "output_router_logits", "router_aux_loss_coef"):
        config.pop(key)
    config.update(model_type="sdar", architectures=["SDARForCausalLM"])
    (dense_dir / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(moe_dir / "model.safetensors"))
    dense_tensors = {name.replace(".mlp.experts.0.", ".mlp."): t for name, t in tensors.items()
                     if not name.endswith("mlp.gate.weight")}  # the router goes; expert 0 becomes the MLP
    save_file(dense_tensors, str(dense_dir / "model.safetensors"))
    moe, dense = load_masked_lm(moe_dir), load_masked_lm(dense_dir)
    assert moe.family.name == "sdar_moe" and dense.family.name == "sdar"
    assert all(layer.moe is not None for layer in moe.model.layers) and all(
        layer.moe is None for layer in dense.model.layers)
    ids, attn = padded_batch(0, 11, (0, 3, 6), moe.pad_id)
    with torch.no_grad():
        assert torch.equal(moe.logits(ids, attn), dense.logits(ids, attn))
    settings = SamplerSettings(gen_length=8, block_length=BLOCK, steps=8, confidence_threshold=0.3)
    assert torch.equal(decode(moe, ids, attn, settings).completion_bg, decode(dense, ids, attn, settings).completion_bg)


def test_logits_equal_transformers_qwen3_moe_under_the_block_mask(snapshot, lm, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "qwen3_moe" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Qwen3-MoE (the public code SDAR-MoE's network is built on)")
    qwen_dir = tmp_path / "qwen3_moe"
    shutil.copytree(snapshot, qwen_dir)
    config = json.loads((snapshot / "config.json").read_text())
    config.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    (qwen_dir / "config.json").write_text(json.dumps(config))
    qwen = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids, attn = padded_batch(1, 14, (0, 5), lm.pad_id)
    allowed = block_causal_mask(attn, BLOCK)
    with torch.no_grad():  # eager attention adds the mask: 0 where a query may attend, -inf elsewhere
        theirs = qwen(ids, attention_mask=torch.zeros(allowed.shape).masked_fill(~allowed, -torch.inf),
                      position_ids=row_positions(attn)).logits
        ours = lm.logits(ids, attn)
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_loads_as_the_sdar_moe_family_with_the_layers_config_json_names(lm):
    from dipod.lm.processes.block_causal import BlockCausalProcess
    from dipod.lm.processes.registry import process_of

    assert lm.family.name == "sdar_moe" and isinstance(process_of(lm), BlockCausalProcess)
    assert lm.model.spec.block_size == BLOCK and lm.mask_id == 120
    assert [layer.moe is not None for layer in lm.model.layers] == [True, False, True]
    assert len(lm.model.layers[0].moe.experts) == 4 and lm.model.layers[0].moe.shared_experts is None


def test_lora_reaches_attention_dense_mlp_and_every_expert(snapshot):
    pytest.importorskip("peft")
    lm = load_masked_lm(snapshot, lora=LoraSettings(r=2, alpha=4.0, dropout=0.0))
    adapted = {name.rsplit(".lora_A", 1)[0].replace("base_model.model.", "")
               for name, _ in lm.model.named_parameters() if ".lora_A" in name}
    experts = {f"layers.{i}.moe.experts.{e}.{part}" for i in (0, 2) for e in range(4)
               for part in ("gate_proj", "up_proj", "down_proj")}
    assert experts | {"layers.1.gate_proj", "layers.1.down_proj", "layers.2.q_proj", "layers.0.o_proj"} <= adapted
    assert not any(name.endswith("moe.gate") or name.endswith("head") for name in adapted)


def test_a_batch_decodes_as_its_rows_and_the_cache_changes_nothing(lm):
    ids, attn = padded_batch(2, 13, (0, 4, 9), lm.pad_id)
    settings = dict(gen_length=8, block_length=BLOCK, steps=8, fill_after_eos=False, confidence_threshold=0.3)
    plain = decode(lm, ids, attn, SamplerSettings(**settings))
    cached = decode(lm, ids, attn, SamplerSettings(**settings, kv_cache="prefix"))
    assert torch.equal(plain.completion_bg, cached.completion_bg) and plain.forward_passes == cached.forward_passes
    for n in range(ids.shape[0]):
        real = attn[n].bool()
        alone = decode(lm, ids[n:n + 1, real], attn[n:n + 1, real], SamplerSettings(**settings))
        assert torch.equal(alone.completion_bg, plain.completion_bg[n:n + 1])
