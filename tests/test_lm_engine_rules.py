"""Each engine's own rules in dipod.lm.engines, one process: the branches for DeepSpeed and FSDP run here
against a recording stand-in for accelerate's Accelerator (the real engines run in the slow 2-process
tests of test_lm_engines.py, which mutation testing and the default suite cannot afford)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from dipod.config import ConfigError
from dipod.lm import engines
from dipod.lm.engines import Engine, detect_engine
from test_lm_engines import config


class RecordingAccelerator:
    """What the engine asks of accelerate, in order; ``zero_stage`` None means no DeepSpeed plugin."""

    def __init__(self, is_main_process: bool = True, zero_stage: int | None = None, norm: float | None = 3.0,
                 num_processes: int = 2):
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage, deepspeed_config={})
        self.state = SimpleNamespace(deepspeed_plugin=plugin)
        self.is_main_process, self.norm, self.num_processes = is_main_process, norm, num_processes
        self.calls: list[tuple] = []

    def clip_grad_norm_(self, params, max_norm):
        self.calls.append(("clip", list(params), max_norm))
        return None if self.norm is None else torch.tensor(self.norm)

    def wait_for_everyone(self):
        self.calls.append(("wait",))

    def save_state(self, folder, **kwargs):
        self.calls.append(("save_state", folder, kwargs))

    def load_state(self, folder, **kwargs):
        self.calls.append(("load_state", folder, kwargs))

    def get_state_dict(self, model):
        return {"gathered": model}

    def prepare(self, model, optimizer):
        return ("prepared", model, optimizer)


def engine_of(kind: str, accelerator: RecordingAccelerator | None = None, **cfg) -> Engine:
    engine = object.__new__(Engine)  # the rules only, without building an Accelerator
    engine.kind, engine.cfg = kind, config(**cfg)
    engine.accelerator = accelerator or RecordingAccelerator(zero_stage=2 if kind == "deepspeed" else None)
    return engine


# ----------------------------------------------------------------------------- which engine, which dtype

@pytest.mark.parametrize("env, kind", [
    ({}, "single"),
    ({"WORLD_SIZE": "1"}, "single"),
    ({"WORLD_SIZE": "2"}, "ddp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, "deepspeed"),
    ({"ACCELERATE_USE_DEEPSPEED": "TRUE"}, "deepspeed"),  # accelerate writes "true"; users write either
    ({"ACCELERATE_USE_DEEPSPEED": "false", "WORLD_SIZE": "4"}, "ddp"),
    ({"ACCELERATE_USE_FSDP": "True", "WORLD_SIZE": "2"}, "fsdp"),
    ({"ACCELERATE_USE_FSDP": "false"}, "single"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "true"}, "deepspeed"),
])
def test_the_engine_is_read_from_the_launch_environment(monkeypatch, env, kind):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detect_engine() == kind


def test_float32_full_fine_tuning_loads_float32_under_every_engine():
    assert all(engines.load_dtype(0, "float32", kind) == "float32" for kind in engines.ENGINE_KINDS)
    assert engines.load_dtype(0, "float16", "ddp") == "float32"
    assert engines.load_dtype(1, "float16", "deepspeed") == "float16"


@pytest.mark.parametrize("theirs", [None, "auto", "none", "None", 4, "4", 4.0])
def test_a_setting_left_to_us_or_equal_to_ours_is_accepted(theirs):
    engines._require_same("gradient_accumulation_steps", 4, "the DeepSpeed config", theirs)


def test_a_contradicting_setting_names_both_values_and_the_fix():
    with pytest.raises(ConfigError) as refused:
        engines._require_same("gradient_accumulation_steps", 4, "the DeepSpeed config", "8")
    assert str(refused.value) == (
        "gradient_accumulation_steps: the trainer's flag says 4 but the DeepSpeed config says 8; the trainer's flags "
        "decide, so remove it from the DeepSpeed config (or set it to 'auto'), or pass the same value")


def test_a_deepspeed_train_batch_size_that_contradicts_ours_is_refused_by_name():
    cfg = config(gradient_accumulation_steps=4, max_grad_norm=0.5)
    with pytest.raises(ConfigError) as refused:
        engines.deepspeed_batch_settings({"train_batch_size": 95}, cfg, micro_batch=3, world=8)
    assert str(refused.value).startswith("train_batch_size (micro-batch x accumulation x processes): the trainer's "
                                         "flag says 96 but the DeepSpeed config says 95;")
    for key, value, what in [("gradient_accumulation_steps", 2, "gradient_accumulation_steps: "),
                             ("gradient_clipping", 1.0, "max_grad_norm (DeepSpeed gradient_clipping): "),
                             ("train_micro_batch_size_per_gpu", 1, "micro-batch size (prompts_per_step x "
                              "num_generations / processes / accumulation): ")]:
        with pytest.raises(ConfigError, match="the DeepSpeed config says") as refused:
            engines.deepspeed_batch_settings({key: value}, cfg, micro_batch=3, world=8)
        assert str(refused.value).startswith(what)


# ----------------------------------------------------------------------------- building the Accelerator

class FakeAccelerator(RecordingAccelerator):
    """accelerate.Accelerator as Engine.__init__ builds it: records its arguments."""

    built: list[dict] = []

    def __init__(self, gradient_accumulation_plugin, mixed_precision):
        super().__init__(zero_stage=FakeAccelerator.zero_stage)
        FakeAccelerator.built.append({"accumulation": gradient_accumulation_plugin.num_steps,
                                      "mixed_precision": mixed_precision})


@pytest.fixture
def fake_accelerate(monkeypatch):
    import accelerate
    from accelerate.state import AcceleratorState

    resets, hooks = [], []
    FakeAccelerator.built, FakeAccelerator.zero_stage = [], None
    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    monkeypatch.setattr(AcceleratorState, "_reset_state", staticmethod(lambda *args: resets.append(args)))
    monkeypatch.setattr(engines, "_count_deepspeed_cpu_processes", lambda acc: hooks.append(("deepspeed", acc)))
    monkeypatch.setattr(engines, "_fsdp_on_cpu_processes", lambda acc: hooks.append(("fsdp", acc)))
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION",
                 "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.delenv(name, raising=False)
    return SimpleNamespace(resets=resets, hooks=hooks)


@pytest.mark.parametrize("env, kind, dtype, mixed, weights", [
    ({}, "single", "bfloat16", "bf16", "float32"),
    ({"WORLD_SIZE": "2"}, "ddp", "float16", "fp16", "float32"),
    ({"WORLD_SIZE": "2"}, "ddp", "float32", "no", "float32"),
    ({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}, "fsdp", "bfloat16", "bf16", "float32"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}, "deepspeed", "bfloat16", "bf16",
     "bfloat16"),
])
def test_the_accelerator_gets_our_accumulation_and_precision(fake_accelerate, monkeypatch, env, kind, dtype, mixed,
                                                             weights):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    FakeAccelerator.zero_stage = 2 if kind == "deepspeed" else None
    engine = Engine(config(gradient_accumulation_steps=3, dtype=dtype, lora_r=0))
    assert (engine.kind, engine.weights_dtype) == (kind, weights)
    assert FakeAccelerator.built == [{"accumulation": 3, "mixed_precision": mixed}]
    # a launched DeepSpeed / FSDP engine owns accelerate's process state; one process or DDP starts it afresh
    assert fake_accelerate.resets == ([] if kind in ("deepspeed", "fsdp") else [(True,)])
    assert fake_accelerate.hooks == ([(kind, engine.accelerator)] if kind in ("deepspeed", "fsdp") else [])


def test_lora_under_ddp_computes_in_its_dtype_without_mixed_precision(fake_accelerate, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    engine = Engine(config(lora_r=4, dtype="bfloat16"))
    assert engine.weights_dtype == "bfloat16" and FakeAccelerator.built[0]["mixed_precision"] is None


def test_a_launch_accumulation_other_than_ours_is_refused_naming_the_launch_config(fake_accelerate, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    assert Engine(config(gradient_accumulation_steps=2)).kind == "single"
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    with pytest.raises(ConfigError) as refused:
        Engine(config(gradient_accumulation_steps=2))
    assert str(refused.value) == (
        "gradient_accumulation_steps: the trainer's flag says 2 but the accelerate launch config says 8; the "
        "trainer's flags decide, so remove it from the accelerate launch config (or set it to 'auto'), or pass the "
        "same value")
    assert len(FakeAccelerator.built) == 1  # the refusal comes before an Accelerator is built


def test_a_deepspeed_launch_without_its_plugin_is_refused_with_the_cpu_recipe(fake_accelerate, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    with pytest.raises(ConfigError) as refused:
        Engine(config(dtype="float32"))
    assert str(refused.value) == ("the launch asks for DeepSpeed but accelerate started without it (ACCELERATE_USE_CPU=1 "
                                  "turns DeepSpeed off); on a CPU host launch with DS_ACCELERATOR=cpu alone")
    assert fake_accelerate.hooks == []


@pytest.mark.parametrize("kind, launched, dtype, message", [
    ("ddp", "fp16", "bfloat16", "precision: the trainer's --dtype is bfloat16 but the accelerate launch config says "
                                "mixed_precision: fp16; make them agree (bf16 for --dtype bfloat16)"),
    ("deepspeed", "no", "bfloat16", "precision: the trainer's --dtype is bfloat16 but the DeepSpeed launch config says "
                                    "mixed_precision: no; set mixed_precision: bf16 in it (DeepSpeed casts the model "
                                    "to its own precision)"),
])
def test_a_launch_precision_other_than_our_dtype_is_refused_in_one_line(monkeypatch, kind, launched, dtype, message):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    with pytest.raises(ConfigError) as refused:
        engine_of(kind)._mixed_precision(config(dtype=dtype))
    assert str(refused.value) == message


def test_deepspeed_in_float32_needs_no_mixed_precision(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert engine_of("deepspeed")._mixed_precision(config(dtype="float32", lora_r=0)) == "no"


# ----------------------------------------------------------------------------- batch, loading, prepare

def test_only_deepspeed_takes_the_micro_batch_into_its_config():
    untouched = engine_of("ddp", RecordingAccelerator())
    untouched.set_micro_batch(3)
    assert untouched.accelerator.state.deepspeed_plugin is None
    engine = engine_of("deepspeed", RecordingAccelerator(zero_stage=2, num_processes=8),
                       gradient_accumulation_steps=4, max_grad_norm=0.5)
    engine.accelerator.state.deepspeed_plugin.deepspeed_config.update(gradient_clipping="auto", zero_optimization={})
    engine.set_micro_batch(3)
    assert engine.accelerator.state.deepspeed_plugin.deepspeed_config == {
        "gradient_clipping": 0.5, "zero_optimization": {}, "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 4, "train_batch_size": 96}


@pytest.mark.parametrize("zero_stage, unset", [(None, False), (2, False), (3, True)])
def test_whole_model_loading_lifts_zero3_partitioning_for_the_block_only(monkeypatch, zero_stage, unset):
    import transformers.integrations

    events = []
    monkeypatch.setattr(transformers.integrations, "unset_hf_deepspeed_config", lambda: events.append("unset"))
    engine = engine_of("deepspeed" if zero_stage else "ddp", RecordingAccelerator(zero_stage=zero_stage))
    if zero_stage:
        engine.accelerator.state.deepspeed_plugin.set_deepspeed_weakref = lambda: events.append("restored")
    with pytest.raises(RuntimeError, match="loading failed"), engine.whole_model_loading():
        events.append("load")
        raise RuntimeError("loading failed")
    assert events == (["unset", "load", "restored"] if unset else ["load"])  # restored even when loading fails


def _moe_model():
    from dipod.lm.networks.moe import MoE

    return torch.nn.Sequential(torch.nn.Linear(2, 2), MoE(gate=torch.nn.Identity(), experts=[], shared_experts=None))


@pytest.mark.parametrize("kind, zero_stage, routed", [("ddp", None, True), ("ddp", None, False),
                                                      ("deepspeed", 3, True), ("deepspeed", 2, True),
                                                      ("deepspeed", 3, False), ("fsdp", None, True)])
def test_prepare_tells_ddp_and_zero3_about_routed_experts(monkeypatch, kind, zero_stage, routed):
    import deepspeed.utils

    leaves = []
    monkeypatch.setattr(deepspeed.utils, "set_z3_leaf_modules", lambda model, classes: leaves.append((model, classes)))
    engine = engine_of(kind, RecordingAccelerator(zero_stage=zero_stage))
    model = _moe_model() if routed else torch.nn.Linear(2, 2)
    assert engine.prepare(model, "opt") == ("prepared", model, "opt")
    handler = getattr(engine.accelerator, "ddp_handler", None)
    assert (handler is not None and handler.find_unused_parameters) == (routed and kind == "ddp")
    from dipod.lm.networks.moe import MoE

    assert leaves == ([(model, [MoE])] if routed and zero_stage == 3 else [])


@pytest.mark.parametrize("kind, zero_stage, planner, shards_state, shards_weights, steps_in_backward", [
    ("single", None, "ddp", False, False, False),
    ("ddp", None, "ddp", False, False, False),
    ("deepspeed", 2, "zero2", True, False, True),
    ("deepspeed", 3, "zero3", True, True, True),
    ("fsdp", None, "fsdp", True, True, False),
])
def test_what_each_engine_shards_and_where_it_steps(kind, zero_stage, planner, shards_state, shards_weights,
                                                    steps_in_backward):
    engine = engine_of(kind, RecordingAccelerator(zero_stage=zero_stage))
    assert (engine.planner_engine, engine.shards_state, engine.shards_weights, engine.steps_in_backward) == (
        planner, shards_state, shards_weights, steps_in_backward)
    model = torch.nn.Linear(2, 2)
    assert engine.gathered_state_dict(model) == ({"gathered": model} if shards_weights else None)


# ----------------------------------------------------------------------------- clipping

def _half_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    return model


@pytest.mark.parametrize("kind", ["single", "ddp", "fsdp"])
def test_clipping_outside_deepspeed_covers_the_trained_weights_and_zero_means_none(kind):
    model = _half_frozen()
    engine = engine_of(kind)
    assert engine.clip_grad_norm(model, 0.0) == 3.0
    assert engine.clip_grad_norm(model, 0.5) == 3.0
    trained = list(model[1].parameters())
    assert [(c[0], len(c[1]), c[2]) for c in engine.accelerator.calls] == [("clip", 2, float("inf")), ("clip", 2, 0.5)]
    assert all(a is b for a, b in zip(engine.accelerator.calls[0][1], trained))


def test_deepspeed_reports_the_norm_its_engine_step_clipped_with_our_setting():
    model = _half_frozen()
    engine = engine_of("deepspeed")
    assert engine.clip_grad_norm(model, 0.5) == 3.0 and isinstance(engine.clip_grad_norm(model, 0.5), float)
    call = engine.accelerator.calls[0]
    assert call[0] == "clip" and call[2] == 0.5 and len(call[1]) == 4  # accelerate hands the call to the engine
    engine.accelerator.norm = None
    assert engine.clip_grad_norm(model, 0.5) is None


# ----------------------------------------------------------------------------- sharded checkpoints

@pytest.mark.parametrize("kind, main, kwargs", [("deepspeed", True, {"exclude_frozen_parameters": True}),
                                                ("fsdp", True, {}), ("fsdp", False, {})])
def test_every_rank_saves_its_shards_into_a_folder_the_main_process_emptied_first(tmp_path, kind, main, kwargs):
    engine = engine_of(kind, RecordingAccelerator(is_main_process=main, zero_stage=2 if kind == "deepspeed" else None))
    folder = engine.staging_dir(tmp_path, 7)
    assert folder == tmp_path / ".checkpoint-7.engine"
    folder.mkdir()
    (folder / "stale_shard").write_text("from a killed save")
    engine.accelerator.wait_for_everyone = lambda: engine.accelerator.calls.append(("wait", folder.exists()))
    engine.save_shards(folder)
    assert engine.accelerator.calls == [("wait", not main), ("save_state", str(folder), kwargs)]
    fresh = engine.staging_dir(tmp_path, 8)  # the usual case: no killed save left a folder behind
    engine.save_shards(fresh)
    assert engine.accelerator.calls[-1] == ("save_state", str(fresh), kwargs)


def test_loading_shards_needs_the_engines_folder(tmp_path):
    engine = engine_of("fsdp")
    missing = tmp_path / "checkpoint-3" / "engine"
    with pytest.raises(FileNotFoundError) as refused:
        engine.load_shards(missing)
    assert str(refused.value) == (f"checkpoint {tmp_path / 'checkpoint-3'} has no engine/ folder of fsdp state; "
                                  "resume it under the engine that wrote it")
    missing.mkdir(parents=True)
    engine.load_shards(missing)
    ds = engine_of("deepspeed")
    ds.load_shards(missing)
    assert engine.accelerator.calls == [("load_state", str(missing), {})]
    assert ds.accelerator.calls == [("load_state", str(missing), {"load_module_strict": False})]  # frozen weights


# ----------------------------------------------------------------------------- CPU process groups

@pytest.fixture
def process_state(monkeypatch):
    shared = {"num_processes": 1, "process_index": 0, "local_process_index": 0}
    monkeypatch.setattr(PartialState, "_shared_state", shared)
    return shared


@pytest.mark.parametrize("local_rank, expected_local", [(None, 3), ("1", 1)])
def test_deepspeed_on_cpu_processes_takes_count_and_ranks_from_its_process_group(monkeypatch, process_state,
                                                                                  local_rank, expected_local):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    accelerator = SimpleNamespace(num_processes=1, state=SimpleNamespace())
    engines._count_deepspeed_cpu_processes(accelerator)
    expected = {"num_processes": 4, "process_index": 3, "local_process_index": expected_local}
    assert process_state == expected and vars(accelerator.state) == expected


@pytest.mark.parametrize("initialized, world", [(False, 4), (True, 1)])
def test_deepspeed_process_state_that_already_agrees_is_left_alone(monkeypatch, process_state, initialized, world):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    accelerator = SimpleNamespace(num_processes=1, state=SimpleNamespace())
    engines._count_deepspeed_cpu_processes(accelerator)
    assert process_state["num_processes"] == 1 and vars(accelerator.state) == {}


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_fsdp_on_cpu_processes_is_selected_as_on_gpus(process_state, mixed):
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = SimpleNamespace(mixed_precision=mixed, distributed_type=DistributedType.MULTI_CPU)
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, state=state)
    engines._fsdp_on_cpu_processes(accelerator)
    assert state.distributed_type == process_state["distributed_type"] == DistributedType.FSDP
    assert isinstance(state.fsdp_plugin, FullyShardedDataParallelPlugin)
    policy = state.fsdp_plugin.mixed_precision_policy
    assert (policy is None) if mixed == "no" else (policy.param_dtype == torch.bfloat16)


def test_fsdp_on_gpus_is_left_to_accelerate(process_state):
    state = SimpleNamespace(mixed_precision="no", distributed_type=DistributedType.FSDP)
    engines._fsdp_on_cpu_processes(SimpleNamespace(distributed_type=DistributedType.FSDP, state=state))
    assert "distributed_type" not in process_state and not hasattr(state, "fsdp_plugin")

