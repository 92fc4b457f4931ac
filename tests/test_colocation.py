"""Colocation in a real run (tiny model, HF engine, CPU): the engine is built before the trainer's models and released
before they are built; each step releases it for log-probs and updates and resumes its weights for the weight sync,
then its KV cache; while the trainer works, the engine holds no weights (bytes measured); training results equal those
of rollout.colocate=false. And the SGLang mapping of the protocol's memory tags."""

from __future__ import annotations

import json

import pytest

from megatron_harness import spawn
from trainer_assets import build_assets, overrides


def _held_bytes(engine) -> int:
    """Bytes the engine's model holds, measured from its tensors' storages (shared storage once)."""
    storages = {}
    for tensor in (*engine.model.parameters(), *engine.model.buffers()):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def _recording_worker(rank: int, runs: list, out_dir: str) -> None:
    """Train each run, recording engine calls, model construction and the phases of a step in order; the engine's
    memory is measured inside the log-prob and update phases."""
    from mssr_megatron.train import rl_step
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import load_config
    from mssr_megatron.rollout.hf_engine import HFEngine
    from mssr_megatron.train.trainer import train

    events: list[str] = []
    engines: list[HFEngine] = []
    sizes: dict[str, int] = {}  # of the engine as built

    def record(owner, name, label, after=False):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not after:
                events.append(label(*args, **kwargs))
            out = original(*args, **kwargs)
            if after:
                events.append(label(*args, **kwargs))
            return out

        setattr(owner, name, wrapper)

    def engine_built(self, *args, **kwargs):
        engines.append(self)
        sizes.update(full=_held_bytes(self), buffers=sum(b.numel() * b.element_size() for b in self.model.buffers()))
        return "engine built"

    def trainer_phase(name):
        return lambda *args, **kwargs: f"{name} (engine holds {_held_bytes(engines[-1])} bytes)"

    record(HFEngine, "__init__", engine_built, after=True)
    record(MegatronActor, "__init__", lambda *a, **k: "model built", after=True)
    record(HFEngine, "release_memory", lambda self: "release")
    record(HFEngine, "resume_memory", lambda self, tags=None: f"resume {','.join(tags or ['all'])}")
    record(HFEngine, "update_weights", lambda self, *a, **k: "sync")
    record(HFEngine, "generate", lambda self, *a, **k: "generate")
    record(rl_step, "token_logprobs", trainer_phase("logprobs"))
    record(rl_step, "update_policy", trainer_phase("update"))
    for name, (config_path, extra) in runs.items():
        events.clear()
        train(load_config(config_path, extra))
        with open(f"{out_dir}/{name}.json", "w") as f:
            json.dump({"events": events, "sizes": sizes}, f)


def _compress(events: list[str]) -> list[str]:
    """Repeats of a trainer phase once (log-probs run for the policy and the reference, updates per mini-batch)."""
    return [e for i, e in enumerate(events)
            if not (i and events[i - 1] == e and e.startswith(("logprobs", "update")))]


def _metrics(path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if not k.startswith("time") and k not in ("sync/seconds", "sync/gb_per_s")} for line in f]


@pytest.mark.slow
def test_engine_memory_follows_the_phases_of_a_real_step_and_results_do_not_change(tmp_path):
    assets = build_assets(str(tmp_path / "assets"))
    runs = {f"colocate_{flag}": ("examples/configs/tiny_cpu.yaml",
                                 overrides(assets, str(tmp_path / f"run_{flag}"), f"rollout.colocate={flag}"))
            for flag in ("true", "false")}
    spawn(_recording_worker, 1, runs, str(tmp_path))
    on, off = (json.loads((tmp_path / f"colocate_{flag}.json").read_text()) for flag in ("true", "false"))
    full, buffers = on["sizes"]["full"], on["sizes"]["buffers"]
    assert 0 < buffers < full / 1000  # what stays while released: rotary frequencies only
    training = [f"logprobs (engine holds {buffers} bytes)", f"update (engine holds {buffers} bytes)"]
    step = ["generate", "release", *training, "resume weights", "sync", "resume kv_cache"]
    initialisation = ["generate"] * 3  # the tracker's: 24 training prompts in chunks of prompts_per_step (8)
    assert _compress(on["events"]) == [
        "engine built", "release", "model built", "model built",  # policy and reference, in the released room
        "resume weights", "sync", "resume kv_cache",  # the context hands over an engine serving the policy
        *initialisation, "generate",  # tracker initialisation, validation before training
        *step, *step, "generate"]  # two steps, validation at step 2
    served = [f"logprobs (engine holds {full} bytes)", f"update (engine holds {full} bytes)"]
    assert _compress(off["events"]) == ["engine built", "model built", "model built", "sync", *initialisation,
                                        "generate", *(["generate", *served, "sync"] * 2), "generate"]
    assert off["sizes"]["full"] == full
    with_colocation, without = _metrics(tmp_path / "run_true" / "metrics.jsonl"), _metrics(
        tmp_path / "run_false" / "metrics.jsonl")
    assert [m["step"] for m in with_colocation] == [0, 1, 2]
    assert with_colocation == without  # identical training: every weight the engine frees comes back by the sync


def test_sglang_resumes_every_tag_it_released():
    """The protocol's tags map onto all of SGLang's memory tags (its release with tags=None frees all of them)."""
    from mssr_megatron.rollout.protocol import MEMORY_TAGS
    from mssr_megatron.rollout.sglang_engine import MEMORY_TAGS as SGLANG_TAGS
    from mssr_megatron.rollout.sglang_engine import sglang_memory_tags

    assert sglang_memory_tags(["weights"]) == ["weights"]
    assert sglang_memory_tags(["kv_cache"]) == ["kv_cache", "cuda_graph"]
    assert sorted(sglang_memory_tags(list(MEMORY_TAGS))) == sorted(SGLANG_TAGS)  # checked against SGLang's source
    assert sglang_memory_tags(None) is None
    with pytest.raises(ValueError, match="unknown memory tags"):
        sglang_memory_tags(["cuda_graph"])
