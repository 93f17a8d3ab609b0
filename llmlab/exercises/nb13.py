"""Exercise checkers for notebook 13 Memory and mixed precision."""

from __future__ import annotations

from collections.abc import Callable

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["MIXED_PRECISION_OPTIMIZERS", "check_loss_scale_update", "check_mixed_precision_bytes"]


MIXED_PRECISION_OPTIMIZERS = ("adamw", "sgd_momentum", "sgd")


def _mixed_precision_bytes_reference(n_params: int, optimizer: str) -> int:
    from llmlab.memory import _optimizer_bytes

    # fp16/bf16 weights (2) + fp16/bf16 gradients (2) + fp32 master weights (4) + optimizer state
    return 8 * n_params + _optimizer_bytes(optimizer, n_params)


def check_mixed_precision_bytes(fn: Callable[[int, str], int], trials: int = 5, seed: int | None = None,
                                verbose: bool = True) -> Verdict:
    """fn(n_params, optimizer) -> bytes of weights, gradients and optimizer state in mixed-precision
    training (activations excluded); optimizer is "adamw", "sgd_momentum" or "sgd"."""
    g = _generator(seed)
    cases = [(_randint(g, 10**6, 10**11), MIXED_PRECISION_OPTIMIZERS[i % 3]) for i in range(max(trials, 3))]
    return _run("mixed_precision_bytes", fn, _mixed_precision_bytes_reference, cases,
                "2 + 2 bytes for half-precision weights and gradients, 4 for the fp32 master copy, then "
                "the optimizer's fp32 state (AdamW: m and v)", MISTAKES["mixed_precision_bytes"], verbose=verbose)


def _loss_scale_reference(scale: float, found_inf: bool, good_steps: int, growth_interval: int):
    from llmlab.precision import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=scale, growth_interval=growth_interval)
    scaler.growth_tracker, scaler.found_inf = good_steps, found_inf
    return float(scaler.update()), scaler.growth_tracker


def check_loss_scale_update(fn: Callable[[float, bool, int, int], tuple[float, int]], trials: int = 8,
                            seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(scale, found_inf, good_steps, growth_interval) -> (new_scale, new_good_steps): dynamic loss
    scaling as torch.amp.GradScaler does it (backoff 0.5 on overflow, growth 2 after
    growth_interval overflow-free steps in a row)."""
    g = _generator(seed)
    cases = []
    for i in range(max(trials, 4)):
        interval = _randint(g, 2, 10)
        found_inf = i % 2 == 0
        good = interval - 1 if i % 4 == 1 else _randint(g, 0, interval - 1)
        cases.append((float(2 ** _randint(g, 4, 20)), found_inf, good, interval))
    return _run("loss_scale_update", fn, _loss_scale_reference, cases,
                "overflow: halve the scale and restart the count; otherwise count the step and double the "
                "scale when the count reaches growth_interval (then restart it)",
                MISTAKES["loss_scale_update"], verbose=verbose)


def _loss_scale_grow_always(scale, found_inf, good, interval):
    return (scale * 0.5, 0) if found_inf else (scale * 2.0, 0)


def _loss_scale_no_reset(scale, found_inf, good, interval):
    if found_inf:
        return scale * 0.5, good
    good += 1
    return (scale * 2.0, 0) if good >= interval else (scale, good)


def _mixed_state(optimizer: str, n: int) -> int:
    from llmlab.memory import _optimizer_bytes

    return _optimizer_bytes(optimizer, n)



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "mixed_precision_bytes": {
        "no_master": (lambda n, opt: 4 * n + _mixed_state(opt, n),
                      "mixed precision keeps an fp32 master copy of the weights: 4 more bytes per parameter"),
        "fp32_grads": (lambda n, opt: 10 * n + _mixed_state(opt, n),
                       "gradients are computed in half precision: 2 bytes per parameter"),
        "adam_everywhere": (lambda n, opt: 16 * n, "the optimizer state depends on the optimizer: AdamW keeps 2 "
                            "fp32 moments, SGD with momentum 1, plain SGD none"),
    },
    "loss_scale_update": {
        "grow_every_step": (_loss_scale_grow_always,
                            "grow only after growth_interval overflow-free steps in a row, not on every step"),
        "no_reset": (_loss_scale_no_reset, "an overflow restarts the count of good steps at 0"),
    },
}
