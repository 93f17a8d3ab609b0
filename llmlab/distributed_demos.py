"""Worker functions for notebook 15 (distributed training): each runs on every rank under
``llmlab.distributed.launch``, which needs them importable by name (spawned processes cannot see
functions defined in a notebook cell).

- ``zero_stages``: one tiny LLM trained 3 steps with ``ZeroMixedPrecision`` at stages 0-3; the
  bytes each rank holds and the final weights.
- ``parallelism_bytes``: data, tensor and pipeline parallelism on the same model: what each rank
  stores and the bytes it hands to ``torch.distributed`` in one training step.
- ``pipeline_timelines``: GPipe timelines on a shared clock for several micro-batch counts.
- ``pipeline_schedules``: GPipe vs 1F1B, micro-batches of activations held per rank.
- ``notebook_run``: all of these in one launch (each launch costs seconds of process start-up).

Models are ``ModelConfig.tiny`` variants (vocabulary 64), batches are random tokens from fixed
seeds, identical on every rank, each rank taking its slice.
"""

from __future__ import annotations

import copy

import torch

from llmlab.distributed import CommunicationCounter, DataParallel, ZeroMixedPrecision, ring_all_reduce
from llmlab.model import LLM, ModelConfig
from llmlab.parameters import count_trainable_parameters

__all__ = ["in_flight_peak", "notebook_run", "parallelism_bytes", "pipeline_schedules", "pipeline_timelines",
           "tiny_model", "zero_stages"]

VOCAB = 64


def tiny_model(n_layer: int = 4, seed: int = 0, n_embd: int = 32) -> LLM:
    """``ModelConfig.tiny`` with ``n_layer`` layers, width ``n_embd``, 4 query and 4 key/value heads,
    untied embeddings (pipeline stages need that)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny(vocab_size=VOCAB)
    fields = {**cfg.__dict__, "n_layer": n_layer, "tie_embeddings": False, "n_embd": n_embd,
              "n_head": 4, "n_kv_head": 4, "ffn_hidden": 3 * n_embd}  # 4 heads: TP up to 4 ranks
    return LLM(ModelConfig(**fields))


def _batches(steps: int, batch: int, length: int, seed: int = 123) -> torch.Tensor:
    """(steps, batch, length + 1) random tokens, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, batch, length + 1), generator=g)


def zero_stages(rank: int, world: int, steps: int = 3, batch: int = 4, group=None) -> dict:
    """Train the same 2-layer model with ZeRO stages 0-3 (bf16 mixed AdamW, lr 1e-2).

    Each step's global batch of ``batch`` rows is split across the ``world`` ranks of ``group``
    (``rank`` is the rank in it). Returns, per stage: ``bytes`` (params and optimizer after the last
    step, gradients after the last gradient synchronization; ZeroMixedPrecision.state_bytes) and
    ``weights`` (the final 16-bit weights as fp32, on the group's rank 0 only).
    """
    if batch % world:
        raise ValueError(f"batch={batch} must be divisible by the world size {world}")
    b = batch // world
    data = _batches(steps, batch, 16)  # (steps, batch, T+1)
    base = tiny_model(n_layer=2)
    out = {"num_params": count_trainable_parameters(base)[1], "stages": {}}
    for stage in range(4):
        engine = ZeroMixedPrecision(copy.deepcopy(base), stage, lr=1e-2, group=group)
        for s in range(steps):
            rows = data[s, rank * b:(rank + 1) * b]  # (b, T+1): this rank's slice
            engine(rows[:, :-1], rows[:, 1:]).loss.backward()
            engine.finish_gradient_synchronization()
            grads = engine.state_bytes()["grads"]
            engine.step()
            engine.zero_grad()
        held = engine.state_bytes()
        held["grads"] = grads
        held["total"] = held["params"] + held["grads"] + held["optimizer"]
        weights = [w.float() for w in engine.full_parameters()]
        out["stages"][stage] = {"bytes": held, "weights": weights if rank == 0 else None}
    return out


def _tensor_parallel(model: LLM) -> LLM:
    from llmlab.parallel import TensorParallelAttention, TensorParallelMLP

    for layer in model.model.layers:
        layer.self_attn = TensorParallelAttention(layer.self_attn)
        layer.mlp = TensorParallelMLP(layer.mlp)
    return model


def parallelism_bytes(rank: int, world: int, batch: int = 8, length: int = 16, n_micro: int = 4) -> dict:
    """One training step of the 4-layer tiny model under DP, TP and PP on ``world`` ranks.

    For each: parameters this rank stores, payload bytes handed to each torch.distributed call
    (``CommunicationCounter``), and a check against the unsharded model (max |loss difference|).
    DP: each rank takes batch / N rows; TP and PP: every rank sees the whole batch (TP splits
    each layer by heads / hidden units, PP splits the 4 layers into N stages, n_micro
    micro-batches). Also the ring all-reduce of the DP gradient and the bytes it sent.
    """
    from llmlab.parallel import PipelineStage, gpipe_step

    full = tiny_model(n_layer=4)
    rows = _batches(1, batch, length)[0]  # (B, T+1)
    x, y = rows[:, :-1], rows[:, 1:]
    ref_loss = full(x, y).loss.item()
    out = {"num_params": count_trainable_parameters(full)[1], "act_bytes": batch * length * full.config.n_embd * 4}
    # data parallel: a full replica, gradients all-reduced
    dp = DataParallel(copy.deepcopy(full))
    b = batch // world
    with CommunicationCounter() as c:
        dp(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).loss.backward()
        dp.finish_gradient_synchronization()
    flat = torch.cat([p.grad.reshape(-1) for p in dp.module.parameters()])  # (Psi,)
    _, ring_sent = ring_all_reduce(flat)
    out["dp"] = {"params": count_trainable_parameters(dp.module)[1], "comm": dict(c.bytes), "ring_sent": ring_sent}
    # tensor parallel: each layer split across ranks, two all-reduces forward, two backward
    tp = _tensor_parallel(copy.deepcopy(full))
    with CommunicationCounter() as c:
        loss = tp(x, y).loss
        loss.backward()
    out["tp"] = {"params": count_trainable_parameters(tp)[1], "comm": dict(c.bytes), "calls": dict(c.calls),
                 "loss_err": abs(loss.item() - ref_loss)}
    # pipeline parallel: contiguous layers per rank, activations sent forward, gradients back
    stage = PipelineStage(copy.deepcopy(full), world, rank)
    with CommunicationCounter() as c:
        loss, _ = gpipe_step(stage, x, y, n_micro=n_micro)
    out["pp"] = {"params": count_trainable_parameters(stage)[1], "comm": dict(c.bytes),
                 "loss_err": None if loss is None else abs(loss.item() - ref_loss)}
    return out


def pipeline_timelines(rank: int, world: int, micro_counts=(1, 2, 4, 8), batch: int = 16,
                       length: int = 64, n_embd: int = 128, repeats: int = 2) -> dict:
    """GPipe timelines of a 4-layer model of width ``n_embd`` for each micro-batch count m.

    Every rank returns, per m, its events (kind, micro-batch, start, end) on the machine's
    monotonic clock (shared by the processes), from the fastest of ``repeats`` steps (by the
    step's span over all ranks). A barrier lines the ranks up before each step.
    """
    import torch.distributed as dist

    from llmlab.parallel import PipelineStage, gpipe_step

    stage = PipelineStage(tiny_model(n_layer=4, n_embd=n_embd), world, rank)
    rows = _batches(1, batch, length, seed=7)[0]  # (B, T+1)
    out = {}
    for m in micro_counts:
        best = None
        for _ in range(repeats):
            stage.zero_grad()
            dist.barrier()
            _, timeline = gpipe_step(stage, rows[:, :-1], rows[:, 1:], n_micro=m)
            ends = [None] * world
            dist.all_gather_object(ends, (timeline[0][2], timeline[-1][3]))
            span = max(e for _, e in ends) - min(s for s, _ in ends)
            if best is None or span < best[0]:
                best = (span, timeline)
        out[m] = best[1]
    return out


def in_flight_peak(timeline) -> int:
    """Most micro-batches whose forward has run and backward has not, over a rank's timeline: the
    number of micro-batches of activations the stage holds at its peak."""
    peak = held = 0
    for kind, *_ in timeline:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


def pipeline_schedules(rank: int, world: int, n_micro: int = 8) -> dict:
    """GPipe and 1F1B on the 4-layer tiny model (batch 8 x 16 tokens, ``n_micro`` micro-batches):
    each rank's peak micro-batches in flight, event order, and (last rank) the two losses."""
    from llmlab.parallel import PipelineStage, gpipe_step, one_f_one_b_step

    rows = _batches(1, 8, 16)[0]  # (B, T+1)
    out = {}
    for name, step in (("gpipe", gpipe_step), ("1f1b", one_f_one_b_step)):
        stage = PipelineStage(tiny_model(n_layer=4), world, rank)
        loss, timeline, *_ = step(stage, rows[:, :-1], rows[:, 1:], n_micro=n_micro)
        out[name] = {"peak": in_flight_peak(timeline), "order": [e[:2] for e in timeline],
                     "loss": None if loss is None else loss.item()}
    return out


def notebook_run(rank: int, world: int) -> dict:
    """Everything notebook 15 measures, in one launch of ``world`` ranks (each launch costs seconds
    of process start-up): ZeRO stages on groups of 1, 2, ..., ``world`` ranks (``dist.new_group``:
    ranks 0-1 and 2-3 form two groups of 2, and so on), DP/TP/PP bytes on all ranks, one GPipe
    timeline (4 micro-batches of 2 x 64 tokens, width 128) and GPipe vs 1F1B
    (``pipeline_schedules``). Key ``zero`` maps group size to zero_stages' result on the group
    holding this rank."""
    import torch.distributed as dist

    out = {"zero": {}}
    n = 1
    while n <= world:
        groups = [dist.new_group(list(range(s, s + n))) for s in range(0, world, n)]  # all ranks
        out["zero"][n] = zero_stages(rank % n, n, group=groups[rank // n])
        n *= 2
    out["parallel"] = parallelism_bytes(rank, world)
    timeline = pipeline_timelines(rank, world, micro_counts=(4,), batch=8, length=64, n_embd=128)
    out["timeline"] = timeline[4]
    out["schedules"] = pipeline_schedules(rank, world)
    return out
