"""Patches that let megatron-core run forward/backward, TP, PP, DDP + optimizer and dist_checkpointing on CPU + gloo.

Applied explicitly (`apply_cpu_patches()`), and only when no CUDA device is present. Checked on megatron-core 0.16.1
(the newest release for Python 3.11); each patch names the code it replaces and why.

Most CUDA-only spots in megatron-core are device literals inside otherwise device-agnostic code
(`torch.empty(..., device=torch.cuda.current_device())`, `torch.zeros(..., device="cuda")`,
`torch.cuda.synchronize()`). Instead of a process-wide torch function mode (which would intercept every tensor op of
every module), `_CpuTorch` is installed as the `torch` global of the few megatron modules that hold such literals:
only code in those modules sees it, it maps CUDA devices to the CPU in tensor factories and answers
`torch.cuda.current_device()` with "cpu", and everything else passes through to the real torch.
Two spots need real replacements: the CUDA RNG tracker and an assert on the grad type in gradient clipping. The
optimizers' constructors (the distributed optimizer, the bf16/fp16 optimizer) run with `Tensor.type()` naming CPU
tensors by their CUDA type, because they group parameters by those names. Sequence parallelism and the distributed
optimizer need nothing else on gloo (torch 2.13's gloo has reduce_scatter_tensor, all_gather_into_tensor and the
coalescing manager that megatron's grad/param buffers use).
"""

from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass

import torch

CHECKED_VERSIONS = ("0.16.1",)

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "empty_like", "zeros_like")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _CpuCuda(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside patched modules: the current device is the CPU; syncs are no-ops."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def is_available():
        return False


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside patched modules: tensor factories get CPU devices, `torch.cuda` is `_CpuCuda`."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


@dataclass(frozen=True)
class Patch:
    """One patch: what it touches, what it replaces and why."""

    name: str
    targets: tuple[str, ...]
    why: str


# Modules whose `torch` global becomes `_CpuTorch`.
DEVICE_LITERAL_MODULES = (
    "megatron.core.utils",  # GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device()
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq built on the CUDA device
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens on device="cuda"
    "megatron.core.pipeline_parallel.p2p_communication",  # shape buffers on CUDA, torch.cuda.synchronize()
    "megatron.core.tensor_parallel.layers",  # weights without use_cpu_initialization, grad buffers
    "megatron.core.tensor_parallel.mappings",  # sequence parallelism: gather/scatter outputs on the CUDA device
    "megatron.core.transformer.dot_product_attention",  # softmax offsets on the CUDA device
    "megatron.core.transformer.utils",  # the default causal mask is built on device="cuda"
    "megatron.core.distributed.param_and_grad_buffer",  # DDP grad buffers on torch.cuda.current_device()
    "megatron.core.distributed.distributed_data_parallel",  # DDP streams and syncs
    "megatron.core.optimizer.optimizer",  # found_inf / scale tensors on device="cuda"
    "megatron.core.optimizer.clip_grads",  # grad-norm reductions on device="cuda"
    "megatron.core.optimizer.distrib_optimizer",  # distributed optimizer: state buffers on torch.cuda.current_device()
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # save: torch.cuda.synchronize() after staging
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # save: failure flag on torch.cuda.current_device()
)

PATCHES = (
    Patch("device_literals", DEVICE_LITERAL_MODULES,
          "CUDA device literals in device-agnostic code; module-scoped torch stand-in maps them to the CPU"),
    Patch("rng_tracker", ("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
                          "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork",
                          "megatron.core.tensor_parallel.random._get_cuda_rng_state",
                          "megatron.core.tensor_parallel.random._set_cuda_rng_state"),
          "the model-parallel RNG tracker and activation recompute save and swap CUDA generator states; on CPU the "
          "'CUDA' generator is the CPU generator"),
    Patch("tied_embedding_sync", ("megatron.core.models.common.language_module.language_module.LanguageModule"
                                  ".setup_embeddings_and_output_layer",),
          "moves the tied embedding to CUDA (weight.data.cuda()) before its first/last-stage all-reduce; run it "
          "with Tensor.cuda as the identity for the duration of that one call"),
    Patch("clip_grads", ("megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",),
          "asserts param.grad.type() == 'torch.cuda.FloatTensor'; the CPU version checks float32 instead"),
    Patch("optimizer_param_types", ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
                                    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__"),
          "the distributed optimizer and the bf16/fp16 optimizer sort parameters into fp32 / fp16 / bf16 groups by "
          "param.type() == 'torch.cuda.FloatTensor' etc. and raise TypeError for anything else; run each "
          "constructor with Tensor.type() naming CPU tensors by their CUDA type (the dtype decides the group, as "
          "on GPU) for the duration of that one call"),
)

_applied = False


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator: remember the state a manual_seed(seed) gives."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    original = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(original)


@contextlib.contextmanager
def _tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator: run the block under the tracked state, then restore."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    original = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grad_by_total_norm_fp32 without the CUDA tensor-type assert: scale fp32 grads by max_norm / total_norm."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        if g.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects float32/bfloat16 grads, got {g.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _with_tensor_cuda_as_identity(method):
    """Wrap `method` so that Tensor.cuda() returns the tensor itself while it runs (restored afterwards)."""

    def wrapped(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return wrapped


def _cuda_type_name(tensor, *args, **kwargs):
    """Tensor.type() that names a CPU tensor by its CUDA type ('torch.FloatTensor' -> 'torch.cuda.FloatTensor');
    with arguments (a conversion) it is the real Tensor.type."""
    real = _REAL_TENSOR_TYPE(tensor, *args, **kwargs)
    if args or kwargs or tensor.is_cuda or not real.startswith("torch."):
        return real
    return "torch.cuda." + real[len("torch."):]


_REAL_TENSOR_TYPE = torch.Tensor.type


def _with_tensor_type_as_cuda(method):
    """Wrap `method` so that Tensor.type() names CPU tensors by their CUDA type while it runs (restored after)."""

    def wrapped(*args, **kwargs):
        torch.Tensor.type = _cuda_type_name
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.type = _REAL_TENSOR_TYPE

    return wrapped


def apply_cpu_patches(force: bool = False) -> bool:
    """Apply every patch once. Does nothing where CUDA is available unless `force`. Returns whether patches are on."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version not in CHECKED_VERSIONS:
        import warnings

        warnings.warn(f"megatron_patches.cpu was checked on megatron-core {CHECKED_VERSIONS}, found {version}")
    stand_in = _CpuTorch()
    for module_name in DEVICE_LITERAL_MODULES:
        importlib.import_module(module_name).torch = stand_in
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    tp_random.CudaRNGStatesTracker.add = _tracker_add
    tp_random.CudaRNGStatesTracker.fork = _tracker_fork
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_cuda_as_identity(
        LanguageModule.setup_embeddings_and_output_layer
    )
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for optimizer_class in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        optimizer_class.__init__ = _with_tensor_type_as_cuda(optimizer_class.__init__)
    # The optimizer imported the function by name; point its reference at the CPU version too.
    from megatron.core.optimizer import optimizer as optimizer_module

    if hasattr(optimizer_module, "clip_grad_by_total_norm_fp32"):
        optimizer_module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _applied = True
    return True
