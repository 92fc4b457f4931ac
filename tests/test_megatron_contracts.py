"""Contract tests: the project's calls into megatron-core, checked against the INSTALLED megatron-core.

The GPU-only branches (Transformer Engine spec, FP8, distributed optimizer, sequence parallelism) never execute on
CPU, so a wrong argument name there would only show on the first GPU run, as a TypeError on every rank. Here:
- every call the project's source makes to a megatron-core function or class that can be resolved statically is bound
  (inspect.signature(...).bind) with the argument names it passes (an AST scan of mssr_megatron/, megatron_patches/,
  tools/);
- the calls whose arguments are computed (the layer-spec builder, TransformerConfig with its FP8 settings, the DDP /
  optimizer / LR-schedule set-up, the pipeline schedule) are bound or built for real with the values each published
  config (examples/configs/*.yaml) produces, for both model.transformer_impl values and with FP8.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import types
from pathlib import Path

import pytest
import torch

from mssr_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SCANNED = [p for d in ("mssr_megatron", "megatron_patches", "tools") for p in sorted((ROOT / d).rglob("*.py"))]
# (transformer_impl, fp8): both layer implementations, and the FP8 settings that only the TE path passes
IMPLS = [("local", None), ("transformer_engine", None), ("transformer_engine", "hybrid")]


@pytest.fixture(scope="module")
def hf_config():
    """A Qwen2.5-VL-shaped transformers config built locally (4 heads / 2 KV heads: TP=2 divides it)."""
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

    return tiny_qwen2_5_vl_config(num_layers=4)


def _run_config(path: Path, impl: str, fp8):
    """The published config with model.transformer_impl / model.fp8 replaced (the YAML itself must load)."""
    cfg = load_config(str(path))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, transformer_impl=impl, fp8=fp8))


def _binder(real, calls: list, result=None):
    """A stand-in for `real` that binds each call against real's signature (TypeError on a wrong argument), records
    the bound arguments and returns `result`."""
    signature = inspect.signature(real)

    def call(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return result

    return call


# ---------------------------------------------------------------------------------------------------- layer spec
@pytest.mark.parametrize("impl,fp8", IMPLS, ids=[f"{i}-fp8_{f}" for i, f in IMPLS])
def test_layer_spec_builder_arguments_bind(impl, fp8):
    from megatron.core.models.gpt import gpt_layer_specs

    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.qwen2_5_vl import layer_spec_arguments

    builder, kwargs = layer_spec_arguments(ModelConfig(transformer_impl=impl, fp8=fp8))
    inspect.signature(getattr(gpt_layer_specs, builder)).bind(**kwargs)


def test_transformer_engine_layer_spec_call_binds(monkeypatch):
    """layer_spec's own call of the TE builder (TE is not installed here: the builder is a binding stand-in).
    Before the fix this raised TypeError: unexpected keyword argument 'normalization'."""
    from megatron.core.models.gpt import gpt_layer_specs

    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models import qwen2_5_vl

    calls: list = []
    real = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", _binder(real, calls, "spec"))
    monkeypatch.setattr(qwen2_5_vl, "_te_available", lambda: True)
    for fp8 in (None, "e4m3"):
        assert qwen2_5_vl.layer_spec(ModelConfig(transformer_impl="transformer_engine", fp8=fp8)) == "spec"
    assert len(calls) == 2 and all(not c.get("qk_layernorm") and not c.get("num_experts") for c in calls)


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("impl,fp8", IMPLS, ids=[f"{i}-fp8_{f}" for i, f in IMPLS])
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_transformer_config_builds_for_every_published_config(hf_config, path, impl, fp8):
    """A real TransformerConfig (its __post_init__ validation included) from language_config for each config and
    layout; the TE spec reads the norm type from it, so it must say RMSNorm."""
    from megatron.core.transformer import TransformerConfig

    from mssr_megatron.models.qwen2_5_vl import language_config

    cfg = _run_config(path, impl, fp8)
    p = cfg.parallel
    config = language_config(hf_config, cfg.model, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                             p.sequence_parallel)
    assert isinstance(config, TransformerConfig)
    assert config.normalization == "RMSNorm"
    assert (config.tensor_model_parallel_size, config.sequence_parallel) == (p.tensor_model_parallel_size,
                                                                             p.sequence_parallel)
    assert config.fp8 == fp8 and config.recompute_granularity == cfg.model.recompute_granularity


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_every_fp8_recipe_is_accepted_by_transformer_config(hf_config, recipe):
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.qwen2_5_vl import language_config

    model = ModelConfig(params_dtype="bfloat16", transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe=recipe)
    assert language_config(hf_config, model).fp8_recipe == recipe

# ---------------------------------------------------------------------------------------------------- training set-up
@pytest.mark.parametrize("impl,fp8", IMPLS[:2], ids=[i for i, _ in IMPLS[:2]])
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_actor_training_setup_calls_bind(hf_config, monkeypatch, path, impl, fp8):
    """MegatronActor._setup_training with each published optimizer config: DistributedDataParallelConfig,
    OptimizerConfig and OptimizerParamScheduler are built for real (their validation runs); the DDP wrapper and
    get_megatron_optimizer (which need a model and process groups) are bound against their signatures."""
    import megatron.core.distributed as mcore_distributed
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.models.qwen2_5_vl import language_config

    cfg = _run_config(path, impl, fp8)
    p = cfg.parallel
    module = types.SimpleNamespace(config=language_config(hf_config, cfg.model, p.tensor_model_parallel_size,
                                                          p.pipeline_model_parallel_size, p.sequence_parallel))
    ddp_calls, optimizer_calls = [], []
    wrapped = types.SimpleNamespace(no_sync=lambda: None)
    optimizer = types.SimpleNamespace(param_groups=[{}], scale_loss=lambda loss: loss)
    monkeypatch.setattr(mcore_distributed, "DistributedDataParallel",
                        _binder(mcore_distributed.DistributedDataParallel, ddp_calls, wrapped))
    monkeypatch.setattr(mcore_optimizer, "get_megatron_optimizer",
                        _binder(mcore_optimizer.get_megatron_optimizer, optimizer_calls, optimizer))
    actor = MegatronActor.__new__(MegatronActor)
    # what __init__ derives from parallel_cfg for the distributed optimizer (read by _setup_training once wired)
    actor.use_distributed_optimizer = cfg.parallel.use_distributed_optimizer
    actor.vision_balance = cfg.model.vision_balance
    actor._setup_training(module, cfg.optimizer, total_optimizer_steps=10)
    assert len(ddp_calls) == 1 and isinstance(ddp_calls[0]["ddp_config"], DistributedDataParallelConfig)
    assert len(optimizer_calls) == 1 and isinstance(optimizer_calls[0]["config"], OptimizerConfig)
    assert actor.scheduler.max_lr == cfg.optimizer.lr and optimizer.param_groups[0]["lr"] >= 0


def test_pipeline_schedule_call_binds(monkeypatch):
    """run_microbatches' call of the schedule returned by get_forward_backward_func, bound against every schedule it
    may return (no pipelining, 1F1B, interleaved)."""
    import megatron.core.pipeline_parallel as pipeline_parallel
    from megatron.core.pipeline_parallel import schedules

    from mssr_megatron.models.provider import run_microbatches

    calls: list = []
    bound = [_binder(fn, calls, []) for fn in (schedules.forward_backward_no_pipelining,
                                                schedules.forward_backward_pipelining_without_interleaving,
                                                schedules.forward_backward_pipelining_with_interleaving)]

    def every_schedule(*args, **kwargs):
        for schedule in bound:
            schedule(*args, **kwargs)
        return []

    monkeypatch.setattr(pipeline_parallel, "get_forward_backward_func",
                        _binder(schedules.get_forward_backward_func, [], every_schedule))
    model = torch.nn.Linear(1, 1)
    batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long)}] * 2
    for forward_only in (True, False):
        run_microbatches(model, batches, forward_only=forward_only, loss_fn=lambda out, b: (out.sum(), {}))
    assert len(calls) == 6 and all(c["num_microbatches"] == 2 for c in calls)


# ---------------------------------------------------------------------------------------------------- every call
def _resolve_import(target: str):
    """'pkg.mod' (a module) or 'pkg.mod:name' (a name in it) -> the object."""
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    if name:
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(f"{module}.{name}")
    return obj


class _MegatronCalls(ast.NodeVisitor):
    """Collects (line, dotted callee, callee object or error, call node) for every call whose callee resolves through
    an `import megatron...` / `from megatron... import` in scope (function-local imports included)."""

    def __init__(self):
        self.scopes: list[dict[str, str]] = [{}]
        self.found: list[tuple[int, str, object, ast.Call]] = []

    @staticmethod
    def _imports(nodes) -> dict[str, str]:
        names = {}
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron.") and not node.level:
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{node.module}:{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("megatron."):
                        names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "megatron"
        return names

    def visit_Module(self, node):
        self.scopes[-1].update(self._imports(node.body))
        self.generic_visit(node)

    def _visit_scope(self, node):
        inner = [n for stmt in node.body for n in ast.walk(stmt)]
        self.scopes.append({**self.scopes[-1], **self._imports(inner)})
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_scope

    def _resolve(self, expr):
        """(dotted name, object) of a callee expression, or None when it does not go through a megatron import."""
        if isinstance(expr, ast.Name) and expr.id in self.scopes[-1]:
            target = self.scopes[-1][expr.id]
            return target, _resolve_import(target)
        if isinstance(expr, ast.Attribute):
            base = self._resolve(expr.value)
            if base is not None:
                return f"{base[0]}.{expr.attr}", getattr(base[1], expr.attr, AttributeError(expr.attr))
        if isinstance(expr, ast.Call):  # get_forward_backward_func()(...): the schedules it returns
            inner = self._resolve(expr.func)
            if inner is not None and inner[0].endswith("get_forward_backward_func"):
                from megatron.core.pipeline_parallel import schedules

                return "<schedule>", schedules.forward_backward_no_pipelining
        return None

    def visit_Call(self, node):
        resolved = self._resolve(node.func)
        if resolved is not None:
            self.found.append((node.lineno, resolved[0], resolved[1], node))
        self.generic_visit(node)


def _bind_problem(obj, call: ast.Call) -> str | None:
    """Why this call's argument names / count do not bind to obj's signature, or None."""
    if isinstance(obj, Exception):
        return f"no such attribute {obj}"
    if isinstance(obj, types.ModuleType) or not callable(obj):
        return None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins / C functions without a signature
        return None
    star = any(isinstance(a, ast.Starred) for a in call.args)
    keywords = {k.arg: object() for k in call.keywords if k.arg is not None}
    positional = [] if star else [object()] * len(call.args)
    try:
        if star or any(k.arg is None for k in call.keywords):  # *args / **kwargs: the explicit part must fit
            signature.bind_partial(*positional, **keywords)
        else:
            signature.bind(*positional, **keywords)
    except TypeError as exc:
        return str(exc)
    return None


def test_every_megatron_call_in_the_source_binds():
    found, problems = [], []
    for path in SCANNED:
        visitor = _MegatronCalls()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for line, name, obj, call in visitor.found:
            found.append(name)
            problem = _bind_problem(obj, call)
            if problem:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name}: {problem}")
    assert not problems, "calls that do not fit the installed megatron-core:\n" + "\n".join(problems)
    # the scan must actually see the calls it is meant to guard (so that it cannot pass by finding nothing)
    expected = ("GPTModel", "TransformerConfig", "DistributedDataParallel", "DistributedDataParallelConfig",
                "OptimizerConfig", "get_megatron_optimizer", "OptimizerParamScheduler", "dist_checkpointing.save",
                "dist_checkpointing.load", "<schedule>", "initialize_model_parallel")
    seen = {name.replace(":", ".") for name in found}
    missing = [e for e in expected if not any(s == e or s.endswith("." + e) for s in seen)]
    assert not missing, f"the scan no longer finds {missing}; found {sorted(seen)}"


def test_the_scan_reports_a_misspelt_argument_and_a_missing_function():
    source = ("from megatron.core import dist_checkpointing\n"
              "def build():\n"
              "    from megatron.core.transformer import TransformerConfig as TC\n"
              "    TC(num_layers=2, normalisation='RMSNorm')\n"
              "    dist_checkpointing.save_everything({}, 'dir')\n")
    visitor = _MegatronCalls()
    visitor.visit(ast.parse(source))
    problems = [_bind_problem(obj, call) for _, _, obj, call in visitor.found]
    assert len(problems) == 2 and "normalisation" in problems[0] and "save_everything" in problems[1]
