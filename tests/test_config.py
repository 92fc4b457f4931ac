"""Config loading, overrides, errors, validation, round trip and field docs (fast, no torch)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from mssr_megatron import config_loader
from mssr_megatron.config import (
    AlgorithmConfig,
    BaselineConfig,
    ConfigError,
    RunConfig,
    dump_yaml,
    field_docs,
    help_text,
    load_config,
    to_dict,
)

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


def all_config_classes(cls: type = RunConfig) -> list[type]:
    out = [cls]
    for f in dataclasses.fields(cls):
        hint = config_loader._hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += all_config_classes(hint)
    return out


def write(tmp_path: pathlib.Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------ examples
def test_examples_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "qwen2_5_vl_7b_mssr.yaml", "qwen2_5_vl_7b_grpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_loads_and_round_trips(path, tmp_path):
    cfg = load_config(str(path))
    assert cfg.rollouts_per_step % cfg.optimizer.mini_batch_size == 0
    dumped = tmp_path / "config.yaml"
    dump_yaml(cfg, dumped)
    assert load_config(str(dumped)) == cfg


def test_published_setups():
    mssr = load_config(str(CONFIGS[0].parent / "qwen2_5_vl_7b_mssr.yaml")).validate(world_size=8)
    grpo = load_config(str(CONFIGS[0].parent / "qwen2_5_vl_7b_grpo.yaml")).validate(world_size=8)
    assert mssr.rollouts_per_step == grpo.rollouts_per_step == 2048
    assert mssr.optimizer_steps_per_step == grpo.optimizer_steps_per_step == 16
    assert (mssr.rollout.n, grpo.rollout.n, grpo.data.prompts_per_step) == (1, 8, 256)
    assert (mssr.optimizer.grad_clip, grpo.optimizer.grad_clip) == (0.5, 1.0)
    assert mssr.algorithm.shaping_enabled() and not grpo.algorithm.shaping_enabled()
    assert grpo.algorithm.clip_ratio_high == 0.3 and grpo.rollout.engine == "sglang"  # inherited from the base
    tiny = load_config(str(CONFIGS[0].parent / "tiny_cpu.yaml"))
    assert (tiny.model.params_dtype, tiny.parallel.backend, tiny.rollout.max_new_tokens) == ("float32", "gloo", 12)


# ----------------------------------------------------------------------------------------------------- overrides
def test_overrides_nested_lists_null_numbers():
    cfg = load_config(None, [
        "algorithm.baseline.rho_min=0.9",
        "rollout.stop=['</answer>', '<|im_end|>']",
        "model.hf_path=/models/qwen",
        "model.hf_path=null",
        "optimizer.lr=1e-5",            # PyYAML reads this as a string; float fields accept numeric strings
        "logging.run_name=123",         # a string field keeps the literal text
        "algorithm.dual_clip=null",
        "algorithm.baseline={rho_max: 0.99}",
    ])
    assert cfg.algorithm.baseline.rho_min == 0.9 and cfg.algorithm.baseline.rho_max == 0.99
    assert cfg.rollout.stop == ["</answer>", "<|im_end|>"]
    assert cfg.model.hf_path is None and cfg.algorithm.dual_clip is None
    assert cfg.optimizer.lr == 1e-5 and cfg.logging.run_name == "123"


def test_overrides_apply_after_file(tmp_path):
    path = write(tmp_path, "c.yaml", "optimizer:\n  lr: 2.0e-6\n  grad_clip: 1.0\n")
    cfg = load_config(path, ["optimizer.lr=3e-6"])
    assert cfg.optimizer.lr == 3e-6 and cfg.optimizer.grad_clip == 1.0


@pytest.mark.parametrize("bad", ["optimizer.lr", "=3", "optimizer..lr=1", "lr 3"])
def test_malformed_override(bad):
    assert "expected key=value" in error(overrides=[bad])


# -------------------------------------------------------------------------------------------------------- errors
def test_unknown_key_suggests_closest():
    assert error(overrides=["algorithm.clip_ratio_hgih=0.3"]) == (
        "unknown config key 'algorithm.clip_ratio_hgih' (did you mean 'algorithm.clip_ratio_high'?)"
    )
    assert "did you mean 'algorithm.baseline.rho_min'?" in error(overrides=["algorithm.baseline.rho_mn=0.9"])
    assert "did you mean 'optimizer.lr'?" in error(overrides=["rollout.lr=1"])  # found in another section


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "c.yaml", "algorithm:\n  baseline:\n    kl_windw: 5\n")
    assert error(path) == (
        "unknown config key 'algorithm.baseline.kl_windw' (did you mean 'algorithm.baseline.kl_window'?)"
    )
    path = write(tmp_path, "d.yaml", "modle:\n  hf_path: x\n")
    assert "did you mean 'model'?" in error(path)


def test_bad_literal_value():
    assert error(overrides=["algorithm.loss_agg_mode=token_mean"]) == (
        "algorithm.loss_agg_mode='token_mean' is not allowed; choose one of: "
        "token-mean, seq-mean-token-mean, seq-mean-token-sum"
    )
    assert "choose one of: null, e4m3, hybrid" in error(overrides=["model.fp8=e5m2"])


def test_wrong_types():
    assert error(overrides=["optimizer.lr=fast"]) == "optimizer.lr='fast' must be a float"
    assert error(overrides=["parallel.micro_batch_size=2.5"]) == "parallel.micro_batch_size=2.5 must be an int"
    assert "must be a bool" in error(overrides=["data.shuffle=3"])
    assert "must be a list of strings" in error(overrides=["rollout.stop=</answer>"])
    assert "must be an int or null" in error(overrides=["rollout.val_max_new_tokens=lots"])
    assert "must be a mapping" in error(overrides=["algorithm.baseline=3"])


def test_bool_rejected_for_int_and_int_accepted_for_float():
    assert error(overrides=["parallel.micro_batch_size=true"]) == "parallel.micro_batch_size=True must be an int"
    cfg = load_config(None, ["optimizer.grad_clip=1", "algorithm.dual_clip=2"])
    assert cfg.optimizer.grad_clip == 1.0 and isinstance(cfg.optimizer.grad_clip, float)
    assert isinstance(cfg.algorithm.dual_clip, float)


def test_missing_file_and_bad_yaml(tmp_path):
    assert "config file not found" in error(str(tmp_path / "nope.yaml"))
    assert "cannot parse" in error(write(tmp_path, "bad.yaml", "model: [unclosed\n"))
    assert "must contain a mapping" in error(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


# ---------------------------------------------------------------------------------------------------- validation
def test_divisibility():
    message = error(overrides=["data.prompts_per_step=100", "rollout.n=1", "optimizer.mini_batch_size=64"])
    assert "must be divisible by optimizer.mini_batch_size=64" in message
    message = error(overrides=["optimizer.mini_batch_size=128", "parallel.micro_batch_size=3"])
    assert "must be divisible by parallel.micro_batch_size=3" in message
    cfg = load_config(None, ["parallel.micro_batch_size=8", "parallel.tensor_model_parallel_size=2"])
    cfg.validate(world_size=8)  # DP 4: 128 % (8 x 4) == 0
    with pytest.raises(ConfigError, match="data-parallel size 6"):
        cfg.validate(world_size=12)  # DP 6: 128 % 48 != 0
    with pytest.raises(ConfigError, match="tensor x pipeline"):
        cfg.validate(world_size=7)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_group_estimator_needs_n(estimator):
    assert "needs rollout.n >= 2" in error(overrides=[f"algorithm.estimator={estimator}", "rollout.n=1"])
    load_config(None, [f"algorithm.estimator={estimator}", "rollout.n=8", "data.prompts_per_step=256"])


def test_fp8_needs_transformer_engine():
    assert "set model.transformer_impl=transformer_engine" in error(overrides=["model.fp8=e4m3"])
    load_config(None, ["model.fp8=hybrid", "model.transformer_impl=transformer_engine"])


def test_ranges():
    assert "0 <= rho_min <= rho_max <= 1" in error(overrides=["algorithm.baseline.rho_min=0.99"])
    assert "clip_ratio_low" in error(overrides=["algorithm.clip_ratio_low=1.0"])
    assert "dual_clip=1.0 must be > 1" in error(overrides=["algorithm.dual_clip=1"])
    assert "optimizer.lr=0.0 must be > 0" in error(overrides=["optimizer.lr=0"])
    assert "rollout.n=0 must be > 0" in error(overrides=["rollout.n=0"])
    assert "recompute_method" in error(overrides=["model.recompute_granularity=full"])
    assert "use gloo" in error(overrides=["trainer.device=cpu", "parallel.backend=nccl"])
    assert "reinforce_pp only" in error(overrides=["algorithm.kl_in_reward=true"])


def test_rollout_correction_and_mismatch_alarm_settings():
    cfg = load_config(None)
    assert (cfg.algorithm.rollout_correction, cfg.trainer.max_logprob_mismatch) == ("none", None)  # off by default
    assert "algorithm.tis_cap=0.5 must be >= 1" in error(overrides=["algorithm.rollout_correction=tis",
                                                                   "algorithm.tis_cap=0.5"])
    assert "trainer.max_logprob_mismatch=0.0 must be > 0" in error(overrides=["trainer.max_logprob_mismatch=0"])
    assert "on_logprob_mismatch" in error(overrides=["trainer.on_logprob_mismatch=abort"])
    tis = load_config(None, ["algorithm.rollout_correction=tis", "algorithm.tis_cap=1",
                             "trainer.max_logprob_mismatch=0.05", "trainer.on_logprob_mismatch=stop"])
    assert (tis.algorithm.tis_cap, tis.trainer.max_logprob_mismatch) == (1.0, 0.05)


def test_unknown_estimator_named_with_suggestion():
    message = error(overrides=["algorithm.estimator=mssrr"])
    assert "algorithm.estimator" in message and "'mssrr'" in message and "did you mean 'mssr'?" in message


def test_example_configs_use_registered_names():
    from mssr_megatron.algorithms import ESTIMATORS, POLICY_LOSSES

    for path in CONFIGS:
        cfg = load_config(str(path))
        assert cfg.algorithm.estimator in ESTIMATORS and cfg.algorithm.policy_loss in POLICY_LOSSES


def test_unknown_policy_loss_named_with_suggestion():
    assert "unknown policy loss 'ppo_clp'; did you mean 'ppo_clip'?" in error(overrides=["algorithm.policy_loss=ppo_clp"])


def test_derived_helpers():
    cfg = load_config(None, ["data.prompts_per_step=256", "rollout.n=8"])
    assert cfg.rollouts_per_step == 2048
    assert cfg.checkpoint_dir.endswith("runs/mssr/checkpoints")
    assert BaselineConfig().effective_n0 == pytest.approx(8.0)
    assert BaselineConfig(n0=4.0).effective_n0 == 4.0
    assert AlgorithmConfig().shaping_enabled() and not AlgorithmConfig(estimator="mvsr").shaping_enabled()
    assert not AlgorithmConfig(entropy_shaping=False).shaping_enabled()
    assert AlgorithmConfig(estimator="grpo", entropy_shaping=True).shaping_enabled()


# ------------------------------------------------------------------------------------------- round trip and base
def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, ["rollout.stop=['</answer>']", "model.hf_path=x: y", "logging.run_name=[1, 2]",
                             "data.prompt_template='{problem} 1e-6'", "algorithm.baseline.n0=6"])
    assert cfg.model.hf_path == "x: y" and cfg.logging.run_name == "[1, 2]"
    path = tmp_path / "run" / "config.yaml"
    text = dump_yaml(cfg, path)
    assert path.read_text() == text and "base" not in to_dict(cfg)
    assert load_config(str(path)) == cfg


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "root.yaml", "rollout:\n  n: 4\n  stop: [a, b]\noptimizer:\n  lr: 2.0e-6\n  grad_clip: 0.7\n")
    write(tmp_path, "sub/mid.yaml", "base: ../root.yaml\noptimizer:\n  lr: 3.0e-6\ndata:\n  prompts_per_step: 64\n")
    leaf = write(tmp_path, "sub/leaf.yaml", "base: mid.yaml\nrollout:\n  stop: [c]\n")
    cfg = load_config(leaf, ["optimizer.grad_clip=0.9"])
    assert cfg.rollout.n == 4 and cfg.rollout.stop == ["c"]  # mappings merge, lists replace
    assert cfg.optimizer.lr == 3e-6 and cfg.optimizer.grad_clip == 0.9 and cfg.data.prompts_per_step == 64
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert "cycle" in error(str(tmp_path / "a.yaml"))
    assert "base of" in error(write(tmp_path, "orphan.yaml", "base: missing.yaml\n"))


# ------------------------------------------------------------------------------------------------------- docs
def test_every_field_documented():
    classes = all_config_classes()
    missing = [f"{cls.__name__}.{name}" for cls in classes for name, doc in field_docs(cls).items() if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    assert len(all_config_classes()) == 13  # eval: EvalConfig and its JudgeConfig (issue 14)


def test_help_text_lists_every_leaf():
    text = help_text()
    for key, _, _, doc in config_loader.iter_fields(RunConfig):
        assert key in text and doc in text
    assert "algorithm.baseline.rho_min" in text


def test_a_key_given_twice_in_a_file_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("optimizer:\n  lr: 1.0e-6\n  weight_decay: 0.01\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml line 4: key 'lr' is given twice in one mapping \(first on line "
                                          r"2\); keep one"):
        load_config(path)
    path.write_text("optimizer:\n  lr: 1.0e-6\noptimizer:\n  lr: 1.0e-3\n")  # a section too
    with pytest.raises(ConfigError, match="key 'optimizer' is given twice"):
        load_config(path)


@pytest.mark.parametrize("override", ["data.reward_timeout_s=.inf", "optimizer.lr=.nan", "parallel.timeout_minutes=.inf",
                                      "algorithm.baseline.rho_max=-.inf"])
def test_non_finite_numbers_are_refused(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"{key}=(inf|nan|-inf) must be a finite number"):
        load_config(None, [override])
