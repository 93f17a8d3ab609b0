"""Training and inference memory: an estimator checked against measurement, activation
checkpointing, micro-batches, and the tools that measure memory.

What it implements
- ``training_memory``: the bytes a full or LoRA/QLoRA fine-tuning step holds, by component:
  weights, gradients, fp32 master weights, optimizer state and activations, with ZeRO sharding
  over data-parallel ranks and optimizer offload. Per trainable parameter, mixed-precision AdamW
  holds 2 (16-bit weight) + 2 (16-bit gradient) + 4 (fp32 master) + 4 + 4 (Adam's m and v) = 16
  bytes (Rajbhandari et al. 2020, "ZeRO", section 3.1: 2 + 2 + K with K = 12); fp32 AdamW holds
  4 + 4 + 8 = 16 bytes as well. 8-bit Adam keeps m and v in one byte each plus one fp32 absmax per
  block of 2048 values (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").
- ``activation_bytes``: the bytes saved for the backward pass, counted tensor by tensor for the
  llmlab/transformers LLaMA layer (pre-RMSNorm computed in fp32, RoPE, SwiGLU) and the GPT-2 layer
  (pre-LayerNorm, GELU), after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models", section 4.1: 34 s b h + 5 a s^2 b bytes per GPT layer in 16-bit with
  dropout). Without a fused kernel two (B, H, T, T) tensors are saved (the softmax output and the
  NaN-safe masked probabilities; Korthikanti count 5 bytes per score in 16-bit with dropout);
  with one, only a (B, H, T) log-sum-exp. With
  checkpointing only each layer's input is kept and one layer is rebuilt during backward.
- ``inference_memory``: weights at a given precision plus the KV cache
  (``llmlab.attention.kv_cache_bytes``).
- Measurement: ``measure_peak_memory`` (peak bytes allocated while a function runs; on CPU from
  the PyTorch profiler's allocation events, on CUDA from the caching allocator's peak counter),
  ``measure_retained_memory`` (bytes allocated during a call and still held after it),
  ``measure_saved_activations`` (bytes of the distinct storages autograd saves for backward, via
  ``torch.autograd.graph.saved_tensors_hooks``) and ``held_state_bytes`` (parameters, ``.grad``s,
  master copies and optimizer state actually held). Tests check the estimator against them.
- ``enable_activation_checkpointing``: every decoder layer of an ``llmlab.model.LLM`` runs under
  ``torch.utils.checkpoint`` (the non-reentrant implementation). The forward pass keeps only each
  layer's input instead of all the activations inside the layer; the backward pass runs the
  layer's forward a second time to rebuild them. Memory for activations drops from about
  N * (activations of one layer) to N * (one layer input) + (activations of one layer), for the
  price of one extra forward pass of the layers: about a third more compute per training step
  (forward ~ 1 unit, backward ~ 2 units). Chen et al. 2016, "Training Deep Nets with Sublinear
  Memory Cost"; the same switch as transformers' ``model.gradient_checkpointing_enable()``, and,
  like it, active only in training mode with gradients enabled, so generation is unaffected.
  Dropout masks are the same in the recomputation (``torch.utils.checkpoint`` restores the RNG
  state), so gradients equal those of the plain model.
- ``disable_activation_checkpointing`` and ``is_activation_checkpointing``.
- ``split_micro_batches``: cut a batch (x, y) into k equal micro-batches for
  ``llmlab.train.accumulate_gradients``; equal sizes make the accumulated gradient equal the
  gradient of the whole batch.

What it leaves out: dropout masks (LLaMA trains without dropout), mixture-of-experts layers,
tensor/sequence parallelism (Korthikanti's t), the allocator's fragmentation and the CUDA context
(about 0.3-1 GiB per process), temporary buffers of the backward pass, selective checkpointing,
and the few kB of RNG state that ``torch.utils.checkpoint`` keeps per checkpointed layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmlab.param_count import Architecture, count_parameters
from llmlab.shapes import check_choice, check_int, check_tensor

# ----------------------------------------------------------------------------------------------
# Measuring memory

def _peak_from_profile(prof: torch.profiler.profile) -> int:
    """Peak of the running sum of CPU allocation events (bytes allocated minus freed) in a profile."""
    return _allocation_sums(prof)[0]


def _allocation_sums(prof: torch.profiler.profile) -> tuple[int, int]:
    """(peak, final) running sum of the CPU allocation events (bytes allocated minus freed)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    current = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        current += size
        peak = max(peak, current)
    return peak, current


def _profile_cpu(fn: Callable[[], object]) -> tuple[object, torch.profiler.profile]:
    with _quiet_profiler():
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    try:
        result = fn()
    finally:
        with _quiet_profiler():
            prof.stop()
    return result, prof


def _check_device(fn: Callable[[], object], device: torch.device | str) -> torch.device:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    return device


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """Run ``fn()`` and return (its result, peak bytes allocated during the call above the start level).

    The result counts too (it is allocated during the call). On CPU the allocations come from the
    PyTorch profiler (``profile_memory=True``), which sees every tensor the allocator hands out,
    including the scratch buffers inside fused kernels; the count is exact and repeatable. On CUDA
    it is ``torch.cuda.max_memory_allocated`` minus the allocation at the start.

    >>> _, nbytes = measure_peak_memory(lambda: torch.zeros(1024))
    >>> nbytes
    4096
    """
    device = _check_device(fn, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    result, prof = _profile_cpu(fn)
    return result, _peak_from_profile(prof)


def measure_retained_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """Run ``fn()`` and return (its result, bytes allocated during the call and still held after it).

    After a forward pass this is what autograd saved for backward plus the outputs.

    >>> _, nbytes = measure_retained_memory(lambda: torch.zeros(1024) + 1)  # the temporary is freed
    >>> nbytes
    4096
    """
    device = _check_device(fn, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.memory_allocated(device) - start
    result, prof = _profile_cpu(fn)
    return result, _allocation_sums(prof)[1]


@contextlib.contextmanager
def _quiet_profiler():
    """Silence the profiler's own chatter around start and stop: its C++ side logs a line on file
    descriptor 2, and some torch releases (2.11 among them) warn that "Profiler clears events at the
    end of each cycle", which concerns scheduled multi-cycle profiling, not this single cycle."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events")  # 2.11: "Warning: Profiler..."
        with _quiet_fd2():
            yield


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 to /dev/null for a moment: the profiler's C++ side logs a line on every
    start and stop there, which would clutter notebook outputs. Python warnings are unaffected."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_saved_activations(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, int]:
    """Run ``fn()`` and return (its result, bytes of the distinct storages autograd still holds for
    backward when ``fn`` returns).

    Every tensor an operation saves passes through ``torch.autograd.graph.saved_tensors_hooks``; a
    weak reference tells which of them the graph still holds at the end (an operation whose output
    is not used frees what it saved). Views of one storage count once, and the storages of
    ``exclude`` (pass the model's parameters: they are weights, not activations) not at all. Under
    non-reentrant activation checkpointing the checkpoint's own hooks take over inside each layer,
    so use ``measure_retained_memory`` there.

    >>> w = torch.ones(3, requires_grad=True)
    >>> measure_saved_activations(lambda: (w.exp() * 2).sum(), exclude=[w])[1]  # exp saves its output
    12
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    refs: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    alive = [t for t in (r() for r in refs) if t is not None and t.untyped_storage().data_ptr() not in skip]
    return result, _tensor_bytes(alive)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


def held_state_bytes(model: nn.Module, optimizer: object | None = None) -> dict[str, int]:
    """Bytes held now by the model's parameters, their ``.grad``s, fp32 master copies and optimizer state.

    ``optimizer`` is a ``torch.optim.Optimizer`` or an ``llmlab.precision.MasterWeightOptimizer``
    (its ``master_params`` are the master weights; its inner optimizer's state is the optimizer state).
    Shared (tied) storages count once.

    >>> held_state_bytes(nn.Linear(4, 2, bias=False))["weights"]
    32
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    masters = list(getattr(optimizer, "master_params", []))
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is not None and not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or a MasterWeightOptimizer, "
                        f"got {type(optimizer).__name__}")
    state = [] if inner is None else [v for s in inner.state.values() for v in s.values()
                                      if isinstance(v, torch.Tensor)]  # fmt: skip
    grads = [p.grad for p in params + masters if p.grad is not None]
    out = {"weights": _tensor_bytes(params), "gradients": _tensor_bytes(grads),
           "master_weights": _tensor_bytes(masters), "optimizer_state": _tensor_bytes(state)}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# Estimating memory

PRECISIONS = ("fp32", "bf16_mixed", "fp16_mixed")  # training precisions
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd_momentum", "sgd")
INFERENCE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}  # + "nf4" (4.127 bits)
ADAM_8BIT_BLOCK = 2048  # values per fp32 absmax in bitsandbytes' block-wise 8-bit optimizer state
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes of activations kept for the backward pass of one training step."""

    saved: int  # held from the end of the forward pass until backward uses it
    recomputed: int  # one layer's saved tensors rebuilt during backward (checkpointing), else 0

    @property
    def peak(self) -> int:
        return self.saved + self.recomputed


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device of one training step, by component; ``total`` is what sits on the device."""

    weights: int  # every weight the forward pass reads (trainable and frozen), in its storage format
    gradients: int  # one gradient per trainable parameter
    master_weights: int  # fp32 copies of the trainable parameters (mixed precision only)
    optimizer_state: int  # AdamW m and v, SGD momentum, or 8-bit Adam codes and block scales
    activations: int  # saved for backward (plus one recomputed layer with checkpointing)
    offloaded: int = 0  # bytes moved to CPU memory by optimizer offload (not in total)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_state + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def _architecture(arch_or_model: object) -> tuple[Architecture, int]:
    """(Architecture, exact parameter count) of an Architecture, a ModelConfig or an llmlab LLM."""
    from llmlab.model import LLM, ModelConfig

    if isinstance(arch_or_model, Architecture):
        return arch_or_model, count_parameters(arch_or_model).total
    if isinstance(arch_or_model, ModelConfig):
        arch = Architecture.from_model_config(arch_or_model)
        return arch, count_parameters(arch).total
    if isinstance(arch_or_model, LLM):
        return Architecture.from_model_config(arch_or_model.config), arch_or_model.num_parameters()
    raise TypeError(f"arch_or_model must be an Architecture, a ModelConfig or an llmlab LLM, "
                    f"got {type(arch_or_model).__name__}")


def _lora_targets(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer of one block that LoRA adapts (QLoRA: all of them)."""
    c, h, k, d, f = arch.n_embd, arch.n_head, arch.n_kv_head, arch.head_dim, arch.ffn_hidden
    attn = {"q_proj": (c, h * d), "k_proj": (c, k * d), "v_proj": (c, k * d), "o_proj": (h * d, c)}
    if arch.family == "gpt2":
        return {**attn, "up_proj": (c, f), "down_proj": (f, c)}
    return {**attn, "gate_proj": (c, f), "up_proj": (c, f), "down_proj": (f, c)}


def lora_parameters(arch: Architecture, rank: int) -> int:
    """Trainable parameters of rank-r LoRA on every linear layer of every block: r (in + out) each.

    >>> lora_parameters(Architecture.llama2_7b(), 16)   # 40.0M, 0.59% of 6.74B
    39976960
    """
    rank = check_int("rank", rank, minimum=1)
    return arch.n_layer * sum(rank * (i + o) for i, o in _lora_targets(arch).values())


def _check_dense(arch: Architecture) -> None:
    if arch.n_experts > 1:
        raise ValueError(f"activation_bytes counts dense layers only: n_experts must be 1, got {arch.n_experts}")


def layer_activation_bytes(
    arch: Architecture, batch: int, seq_len: int, dtype_bytes: int = 2, fused_attention: bool = True,
    lora_rank: int | None = None,
) -> int:
    """Bytes one block saves for backward (no dropout), tensor by tensor, for B = batch, T = seq_len.

    LLaMA block (a = dtype_bytes): two RMSNorms computed in fp32 save their fp32 input, 1/rms and
    the normalized output, 2 (4 BTC + 4 BT + a BTC); attention saves its input, q, k and v after
    repeating the K key/value heads to H (what llmlab and transformers' sdpa path hand the kernel),
    and the output, a BTC (1 + 1 + 2 + 1); a fused kernel adds a (B, H, T) fp32 log-sum-exp, the
    plain path two (B, H, T, T) tensors (softmax output, NaN-safe masked probabilities) and a bool
    row mask; SwiGLU saves its input and four (B, T, F) tensors. GPT-2 block: LayerNorms save input,
    mean and rstd, 2 (a BTC + 8 BT); GELU saves two (B, T, F). LoRA on every linear layer adds each
    adapter's (B, T, r) intermediate, and frozen RMSNorm gains no longer need the normalized output.

    >>> layer_activation_bytes(Architecture.llama2_7b(), 1, 4096) / 2**20   # bf16, fused: MiB
    728.53125
    """
    _check_dense(arch)
    b, t = check_int("batch", batch, minimum=1), check_int("seq_len", seq_len, minimum=1)
    a = check_int("dtype_bytes", dtype_bytes, minimum=1)
    c, h, f = arch.n_embd, arch.n_head, arch.ffn_hidden
    btc, bt = b * t * c, b * t
    if fused_attention:
        scores = 4 * b * h * t  # log-sum-exp (B, H, T) in fp32
    else:
        scores = 2 * a * b * h * t * t + b * h * t  # softmax and masked probs (B, H, T, T); bool row mask
    if arch.family == "gpt2":
        norms, mlp_hidden = 2 * (a * btc + 8 * bt), 2  # LayerNorm input, mean, rstd; GELU in and out
    else:
        gain = 0 if lora_rank is not None else a * btc  # x / rms, kept for the gradient of a trainable gain
        norms, mlp_hidden = 2 * (4 * btc + 4 * bt + gain), 4  # SwiGLU: gate, up, SiLU(gate), product
    if lora_rank is None:
        inputs = 2 * a * btc  # attention input, feed-forward input
        return norms + a * btc * (1 + 2 + 1) + scores + inputs + mlp_hidden * a * b * t * f  # q, k, v, out
    # LoRA: each adapter saves its input and its (B, T, r) intermediate. With a 16-bit base the adapters
    # are fp32 (peft's rule, as llmlab.lora) and each one casts its input to its own fp32 copy.
    ad = 4 if a < 4 else a
    rank = check_int("lora_rank", lora_rank, minimum=1)
    targets = _lora_targets(arch)
    if ad == a:  # shared inputs: attention input, feed-forward input, last hidden (out is saved anyway)
        inputs = a * (2 * btc + b * t * f)
    else:
        inputs = ad * bt * sum(i for i, _ in targets.values())
    adapters = inputs + ad * bt * rank * len(targets)
    return norms + a * btc * (1 + 2 + 1) + scores + (mlp_hidden - 1) * a * b * t * f + adapters


def head_activation_bytes(
    arch: Architecture, batch: int, seq_len: int, dtype_bytes: int = 2, frozen: bool = False
) -> int:
    """Bytes saved outside the blocks: token (and position) ids, RoPE cos/sin, the final norm, the
    output head's input, and the cross-entropy's fp32 log-softmax (B, T, V) and int64 targets.

    ``frozen`` (LoRA): embeddings, final norm and output head train nothing, so the ids, the
    normalized output and the head's input are not saved, and neither is anything of the first
    block's input norm (the block input needs no gradient)."""
    _check_dense(arch)
    b, t = check_int("batch", batch, minimum=1), check_int("seq_len", seq_len, minimum=1)
    a = check_int("dtype_bytes", dtype_bytes, minimum=1)
    btc, bt = b * t * arch.n_embd, b * t
    loss = 4 * bt * arch.vocab_size + 8 * bt + 4  # fp32 log-softmax, targets, the loss's weight total
    if arch.family == "gpt2":
        ids, norm = 8 * bt + 8 * t, a * btc + 8 * bt  # token and position ids; LayerNorm input, mean, rstd
        first = norm  # the first block's input LayerNorm
        rope = 0
    else:
        ids, norm = 8 * bt, 4 * btc + 4 * bt + (0 if frozen else a * btc)  # token ids; RMSNorm
        first = 4 * btc + 4 * bt
        rope = 2 * t * arch.head_dim * a  # cos, sin (T, D)
    if frozen:
        return loss + rope + norm - first
    return ids + rope + norm + a * btc + loss


def activation_bytes(
    arch: Architecture, batch: int, seq_len: int, dtype_bytes: int = 2, fused_attention: bool = True,
    checkpointing: bool = False, lora_rank: int | None = None,
) -> ActivationBytes:
    """Activation bytes of one training step: N blocks + the head, or with checkpointing N block
    inputs + the head, and one block rebuilt during backward.

    >>> act = activation_bytes(Architecture.llama2_7b(), 1, 4096, checkpointing=True)
    >>> round(act.saved / 2**30, 3), act.recomputed / 2**20   # GiB kept, MiB rebuilt
    (1.615, 728.53125)
    """
    layer = layer_activation_bytes(arch, batch, seq_len, dtype_bytes, fused_attention, lora_rank)
    head = head_activation_bytes(arch, batch, seq_len, dtype_bytes, frozen=lora_rank is not None)
    if checkpointing:
        return ActivationBytes(arch.n_layer * dtype_bytes * batch * seq_len * arch.n_embd + head, layer)
    return ActivationBytes(arch.n_layer * layer + head, 0)


def _optimizer_bytes(optimizer: str, n: int) -> int:
    if optimizer == "adamw":
        return 8 * n  # m and v in fp32
    if optimizer == "adamw_8bit":
        return 2 * n + 2 * 4 * math.ceil(n / ADAM_8BIT_BLOCK)  # two 1-byte states + fp32 absmax per block
    return 4 * n if optimizer == "sgd_momentum" else 0


def training_memory(
    arch_or_model: object, batch: int, seq_len: int, optimizer: str = "adamw", precision: str = "bf16_mixed",
    checkpointing: bool = False, lora_rank: int | None = None, zero_stage: int = 0, world_size: int = 1,
    qlora: bool = False, fused_attention: bool = True, offload_optimizer: bool = False,
) -> MemoryBreakdown:
    """Bytes per device of one training step with ``batch`` sequences of ``seq_len`` tokens per device.

    precision: "fp32" (4-byte weights and gradients), "bf16_mixed" / "fp16_mixed" (16-bit weights,
    gradients and activations, fp32 master weights). optimizer: "adamw", "adamw_8bit",
    "sgd_momentum", "sgd". lora_rank: train rank-r adapters on every linear layer (base frozen;
    adapters, their gradients and optimizer state in fp32, as peft keeps them);
    qlora: the frozen base in NF4 with double quantization (``llmlab.quantization``). zero_stage
    1/2/3 shards optimizer state and master weights / + gradients / + weights over ``world_size``
    data-parallel ranks (Rajbhandari et al. 2020); stage 0 is plain data parallelism, which keeps a
    full copy on every rank. offload_optimizer moves optimizer state and master weights to CPU.

    >>> round(training_memory(Architecture.llama2_7b(), 1, 512).total / 2**30, 1)  # 16 B/param + activations
    103.3
    """
    from llmlab.quantization import bits_per_parameter

    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("precision", precision, PRECISIONS)
    zero_stage = check_int("zero_stage", zero_stage, minimum=0)
    if zero_stage > 3:
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    world = check_int("world_size", world_size, minimum=1)
    if qlora and lora_rank is None:
        raise ValueError("qlora=True needs a lora_rank (the adapters are what QLoRA trains), got None")
    arch, n_params = _architecture(arch_or_model)
    w = 4 if precision == "fp32" else 2
    if lora_rank is None:
        trainable, tw = n_params, w
        weights, master = w * n_params, 0 if precision == "fp32" else 4 * n_params
    else:  # frozen base; fp32 adapters (peft's rule), which need no separate master copy
        trainable, tw, master = lora_parameters(arch, lora_rank), 4, 0
        base = arch.n_layer * sum(i * o for i, o in _lora_targets(arch).values())  # frozen linear weights
        base_bytes = math.ceil(base * bits_per_parameter() / 8) if qlora else w * base
        weights = base_bytes + w * (n_params - base) + tw * trainable

    def shard(nbytes: int, stage: int) -> int:  # ZeRO stage >= stage splits this component over the ranks
        return math.ceil(nbytes / world) if zero_stage >= stage else nbytes

    master, state = shard(master, 1), shard(_optimizer_bytes(optimizer, trainable), 1)
    act = activation_bytes(arch, batch, seq_len, w, fused_attention, checkpointing, lora_rank).peak
    offloaded = master + state if offload_optimizer else 0
    if offload_optimizer:
        master = state = 0
    return MemoryBreakdown(weights=shard(weights, 3), gradients=shard(tw * trainable, 2),
                           master_weights=master, optimizer_state=state, activations=act, offloaded=offloaded)


def inference_memory(
    arch_or_model: object, batch: int, context: int, precision: str = "bf16", kv_bytes: int = 2
) -> dict[str, int]:
    """Bytes to serve ``batch`` sequences of ``context`` tokens: weights at ``precision``
    ("fp32", "bf16", "fp16", "int8", "int4", "nf4") plus the KV cache with ``kv_bytes`` per value.

    >>> inference_memory(Architecture.llama2_7b(), 1, 4096)["kv_cache"] / 2**30   # GiB
    2.0
    """
    from llmlab.attention import kv_cache_bytes
    from llmlab.quantization import bits_per_parameter

    check_choice("precision", precision, (*INFERENCE_BITS, "nf4"))
    arch, n_params = _architecture(arch_or_model)
    bits = bits_per_parameter() if precision == "nf4" else INFERENCE_BITS[precision]
    kv = kv_cache_bytes(arch.n_layer, arch.n_kv_head, arch.head_dim, context, batch, kv_bytes)
    weights = math.ceil(n_params * bits / 8)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


# ----------------------------------------------------------------------------------------------
# Activation checkpointing and micro-batches

def _llmlab_layers(model: nn.Module) -> nn.ModuleList:
    """``decoder_layers(model)`` of an llmlab ``LLM`` (checkpointing relies on its layers' forward)."""
    from llmlab.peft_utils import decoder_layers, is_llmlab_model

    if not is_llmlab_model(model):
        raise TypeError(f"model must be an llmlab.model.LLM, got {type(model).__name__}")
    return decoder_layers(model)


def _checkpointed_forward(layer: nn.Module) -> Callable:
    """A forward for ``layer`` that checkpoints its class forward while training with gradients."""
    plain = type(layer).forward.__get__(layer)  # the class's forward, bound to this layer

    def forward(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    forward.activation_checkpointing = True  # lets is_activation_checkpointing recognise it
    return forward


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (in place); return the model.

    Parameters, state dict and outputs are unchanged; only what is kept for the backward pass changes.

    >>> from llmlab.model import LLM, ModelConfig
    >>> model = enable_activation_checkpointing(LLM(ModelConfig.tiny(vocab_size=50)))
    >>> is_activation_checkpointing(model)
    True
    """
    for layer in _llmlab_layers(model):
        layer.forward = _checkpointed_forward(layer)  # an instance attribute overrides the class method
    return model


def disable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Undo ``enable_activation_checkpointing`` (in place); return the model."""
    for layer in _llmlab_layers(model):
        layer.__dict__.pop("forward", None)
    return model


def is_activation_checkpointing(model: nn.Module) -> bool:
    """True if every decoder layer of ``model`` is checkpointed."""
    return all(getattr(layer.__dict__.get("forward"), "activation_checkpointing", False)
               for layer in _llmlab_layers(model))  # fmt: skip


def split_micro_batches(
    x: torch.Tensor, y: torch.Tensor, num_micro_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y), each (B, T) -> ``num_micro_batches`` pairs, each (B / k, T), in order.

    B must be divisible by k: ``accumulate_gradients`` averages the micro-batch losses with equal
    weights, which equals the mean over the whole batch only when the micro-batches are equally large.

    >>> [xi.shape[0] for xi, _ in split_micro_batches(torch.zeros(8, 4), torch.zeros(8, 4), 4)]
    [2, 2, 2, 2]
    """
    check_tensor("x", x, ndim=2, layout="(B, T)")
    check_tensor("y", y, ndim=2, layout="(B, T)")
    if x.shape != y.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    k = check_int("num_micro_batches", num_micro_batches, minimum=1)
    if x.shape[0] % k:
        raise ValueError(f"the batch size must be divisible by num_micro_batches={k}, got batch size {x.shape[0]}")
    return list(zip(x.chunk(k), y.chunk(k), strict=True))  # k pairs of (B / k, T)
