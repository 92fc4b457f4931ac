"""What `mssr eval --model X` names, resolved to a Hugging Face directory and the run config it was trained with.

X may be
    an HF directory (config.json)                       served as it is; the config's defaults (prompt template, ...)
    a training run directory (config.yaml)              its newest complete checkpoint, else its HF export <run>/hf
    a run checkpoint (<save_dir>/step_N, COMPLETE)      its policy; the config stored with it (trainer_state.pt)
    a converted checkpoint (mssr_checkpoint.json)       from `mssr convert --to megatron`; the config's defaults
A Megatron checkpoint is exported to HF by the project's converter (checkpoint/convert.py megatron_to_hf) into
<out>/model_hf, once: a later run with the same --out reuses it (eval_meta.json ties the folder to its source).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mssr_megatron.checkpoint.metadata import METADATA_FILE

_STEP = re.compile(r"step_0*(\d+)$")


@dataclass
class ModelSource:
    label: str
    """What produced the answers: the absolute path of the HF directory or of the checkpoint."""
    hf_dir: str | None
    """The HF directory to serve; None until `export` for a Megatron checkpoint."""
    checkpoint: str | None
    """The Megatron checkpoint to export first, or None."""
    config: dict
    """The run config (a plain dict, as config.yaml holds it) whose data.* / rollout.* apply; {} = the defaults."""
    step: int | None
    """The training step of a run checkpoint, else None."""

    def export(self, out_dir: str) -> str:
        """The HF directory to serve: a checkpoint is converted into <out_dir>/model_hf unless already there."""
        if self.hf_dir is None:
            from mssr_megatron.checkpoint.convert import megatron_to_hf

            target = os.path.join(out_dir, "model_hf")
            if not os.path.isfile(os.path.join(target, "config.json")):  # the converter writes it whole or not at all
                megatron_to_hf(self.checkpoint, target)
            self.hf_dir = target
        return self.hf_dir


def _yaml(path: str) -> dict:
    from mssr_megatron.config_loader import load_yaml_file

    return load_yaml_file(path)


def _run_checkpoint(path: str, run_config: dict | None) -> ModelSource:
    from mssr_megatron.train.resume_config import stored_config

    config = stored_config(path) if os.path.isfile(os.path.join(path, "trainer_state.pt")) else None
    if config is None:  # written before checkpoints stored their config: the run's config.yaml beside them
        parent = os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml")
        config = run_config if run_config is not None else (_yaml(parent) if os.path.isfile(parent) else {})
    match = _STEP.search(os.path.basename(path.rstrip("/")))
    return ModelSource(path, None, path, config, int(match.group(1)) if match else None)


def resolve_model(model: str) -> ModelSource:
    """The ModelSource of `model` (see the module docstring); FileNotFoundError in one line when it is none of them."""
    from mssr_megatron.train.run_checkpoint import complete_checkpoints

    path = os.path.abspath(model)
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource(path, path, None, {}, None)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        config = _yaml(os.path.join(path, "config.yaml"))
        save_dir = (config.get("checkpoint") or {}).get("save_dir") or os.path.join(path, "checkpoints")
        found = complete_checkpoints(save_dir)
        if found:
            return _run_checkpoint(found[-1][1], config)
        export = os.path.join(path, "hf")
        if os.path.isfile(os.path.join(export, "config.json")):
            return ModelSource(export, export, None, config, None)
        raise FileNotFoundError(f"--model {model}: the run has no complete checkpoint in {save_dir} and no HF export "
                                f"in {export}: train it further, or pass a checkpoint or HF directory")
    if os.path.exists(os.path.join(path, "COMPLETE")) or os.path.isfile(os.path.join(path, "model", METADATA_FILE)):
        return _run_checkpoint(path, None)
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return ModelSource(path, None, path, {}, None)
    raise FileNotFoundError(f"--model {model} is not a Hugging Face directory (config.json), a training run "
                            "directory (config.yaml), a run checkpoint (step_N with COMPLETE) or a converted Megatron "
                            f"checkpoint ({METADATA_FILE})")
