"""The NCCL variables a served engine sets in its own rank are set on every rank before torch.distributed starts, with
the values SGLang's own start-up code (`_set_envs_and_config`, run on CPU here from the installed source) sets."""

from __future__ import annotations

import ast
import json
import os

import pytest

import sglang_source as src
from megatron_harness import spawn
from mssr_megatron.rollout.nccl_env import ENGINE_NCCL_ENV, set_engine_nccl_env

NCCL_VARS = ("NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE")


def server_arg_defaults(names: list[str]) -> dict:
    """Default values of ServerArgs fields, read from SGLang's field classes (srt/arg_groups/fields/*.py)."""
    fields_dir = src.sglang_file("srt/arg_groups/fields")
    found = {}
    for file in sorted(os.listdir(fields_dir)):
        if file.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(fields_dir, file)).read())):
                if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        and node.target.id in names and node.value is not None):
                    found[node.target.id] = ast.literal_eval(node.value)
    assert set(found) == set(names), set(names) - set(found)
    return found


def sglang_sets(engine_kwargs: dict, environ: dict) -> dict:
    """Run the NCCL part of SGLang's `_set_envs_and_config` (its statements up to the last one naming an NCCL variable
    of ours) on `environ`, for an Engine started with `engine_kwargs`; return the environment it leaves."""
    path = src.sglang_file("srt/entrypoints/engine.py")
    tree = ast.parse(open(path).read())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_set_envs_and_config")
    last = max(i for i, stmt in enumerate(func.body) if any(v in ast.unparse(stmt) for v in NCCL_VARS))
    func.body = func.body[: last + 1]
    tree.body = [func]
    fields = ["nnodes", "enable_kv_cache_sharding", "enable_memory_saver", "enable_symm_mem", "enable_nccl_nvls"]
    cfg = {**server_arg_defaults(fields), **{k: v for k, v in engine_kwargs.items() if k in fields}}

    class Env:  # SGLang's envs registry: the variables this part reads, all unset
        def __getattr__(self, name):
            return type("Var", (), {"get": staticmethod(lambda: None)})

    fake_os = type("os", (), {"environ": environ})
    ns = {"os": fake_os, "resolving_view": lambda args: args, "is_mnnvl_fabric_device": lambda: False,
          "envs": Env(), "logger": type("L", (), {"info": staticmethod(print)})}
    exec(compile(tree, path, "exec"), ns)
    ns["_set_envs_and_config"](type("ServerArgs", (), cfg))
    return environ


@pytest.mark.skipif(src.SPEC is None, reason=src.SKIP_REASON)
@pytest.mark.parametrize("preset", [{}, {"NCCL_CUMEM_ENABLE": "1"}, {"NCCL_NVLS_ENABLE": "1"}])
@pytest.mark.parametrize("colocate", [True, False])
def test_sglang_values_are_what_sglang_sets_in_its_own_rank(preset, colocate):
    from mssr_megatron.config import RolloutConfig
    from mssr_megatron.rollout.sglang_engine import sglang_engine_kwargs

    kwargs = sglang_engine_kwargs("/models/qwen", RolloutConfig(engine="sglang", colocate=colocate))
    engine_rank = sglang_sets(kwargs, dict(preset))
    other_rank = dict(preset)
    assert set_engine_nccl_env("sglang", other_rank) == {v: engine_rank[v] for v in NCCL_VARS}
    assert other_rank == {v: engine_rank[v] for v in NCCL_VARS}


def test_hf_engine_sets_nothing():
    environ = {}
    assert set_engine_nccl_env("hf", environ) == {} and environ == {}


def _rank_env_worker(rank: int, model: str, data: str, out_dir: str) -> None:
    """build_context up to torch.distributed's start, once per served engine: record the NCCL variables as
    init_process_group sees them."""
    import torch.distributed as dist

    from mssr_megatron.config import load_config
    from mssr_megatron.train.run_context import build_context

    class Started(Exception):
        pass

    seen = {}
    for engine in ENGINE_NCCL_ENV:
        for name in NCCL_VARS:
            os.environ.pop(name, None)

        def record(*args, **kwargs):
            seen[engine] = {name: os.environ.get(name) for name in NCCL_VARS}
            raise Started

        dist.init_process_group = record  # parallel.init_megatron calls it through the module
        cfg = load_config("examples/configs/tiny_cpu.yaml", [
            f"model.hf_path={model}", f"data.train_path={data}", "data.val_path=null", "trainer.device=auto",
            f"rollout.engine={engine}", "data.reward_workers=0", f"trainer.output_dir={out_dir}/run_{engine}"])
        with pytest.raises(Started):
            build_context(cfg)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.mark.slow
def test_every_rank_has_the_engine_values_before_torch_distributed_starts(tmp_path):
    from mssr_megatron.data.synthetic import generate_dataset
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    model = build_tiny_model_dir(str(tmp_path / "model"), seed=0)
    train, _ = generate_dataset(str(tmp_path / "data"), 4, 1, seed=0)
    spawn(_rank_env_worker, 2, model, train, str(tmp_path))
    want = {engine: {name: values.get(name) for name in NCCL_VARS} for engine, values in ENGINE_NCCL_ENV.items()}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == want, rank
