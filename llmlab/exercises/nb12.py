"""Exercise checkers for notebook 12 Prompt tuning, prefix tuning and adapters: the inputs a soft
prompt model feeds its frozen decoder, and a bottleneck adapter's forward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_bottleneck_adapter", "check_soft_prompt_inputs"]


def _soft_prompt_inputs_reference(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                                  prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from llmlab.prompt_tuning import _extend_front  # what SoftPromptModel.forward does to mask and labels

    n, b = prompts.shape[0], inputs_embeds.shape[0]
    embeds = torch.cat([prompts.expand(b, -1, -1), inputs_embeds], dim=1)  # (B, N + T, C)
    return embeds, _extend_front(attention_mask, n, 1), _extend_front(labels, n, -100)


def check_soft_prompt_inputs(fn: Callable[..., tuple], trials: int = 5, seed: int | None = None,
                             verbose: bool = True) -> Verdict:
    """fn(inputs_embeds, attention_mask, labels, prompts) -> (inputs_embeds, attention_mask, labels) with
    the N virtual tokens of prompt tuning in front: inputs_embeds (B, T, C) float, attention_mask
    (B, T) long (0 at left padding), labels (B, T) long (-100 where no loss), prompts (N, C) float."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        b, t, c, n = _randint(g, 1, 4), _randint(g, 3, 10), _randint(g, 4, 16), _randint(g, 2, 8)
        ids_len = torch.randint(1, t + 1, (b,), generator=g)  # (B,): real tokens per row, left-padded
        mask = (torch.arange(t) >= t - ids_len[:, None]).long()  # (B, T)
        labels = torch.randint(0, 100, (b, t), generator=g).masked_fill(mask == 0, -100)  # (B, T)
        cases.append((torch.randn(b, t, c, generator=g), mask, labels, torch.randn(n, c, generator=g)))
    return _run("soft_prompt_inputs", fn, _soft_prompt_inputs_reference, cases,
                "put the N prompt vectors in front of every row (B, N + T, C); the mask gets N ones in front "
                "and the labels N times -100 in front", MISTAKES["soft_prompt_inputs"], verbose=verbose)


def _prepend(x, n, fill):
    return torch.cat([x.new_full((x.shape[0], n), fill), x], dim=1)


def _soft_prompt_masked_out(embeds, mask, labels, prompts):
    n = prompts.shape[0]
    return (torch.cat([prompts.expand(embeds.shape[0], -1, -1), embeds], 1), _prepend(mask, n, 0),
            _prepend(labels, n, -100))


def _soft_prompt_label_zero(embeds, mask, labels, prompts):
    n = prompts.shape[0]
    return (torch.cat([prompts.expand(embeds.shape[0], -1, -1), embeds], 1), _prepend(mask, n, 1),
            _prepend(labels, n, 0))


def _soft_prompt_appended(embeds, mask, labels, prompts):
    n = prompts.shape[0]
    ones = mask.new_ones(mask.shape[0], n)
    return (torch.cat([embeds, prompts.expand(embeds.shape[0], -1, -1)], 1), torch.cat([mask, ones], 1),
            torch.cat([labels, torch.full_like(ones, -100)], 1))


def _bottleneck_adapter_reference(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                                  b_up: torch.Tensor) -> torch.Tensor:
    from llmlab.adapters import BottleneckAdapter

    adapter = BottleneckAdapter(w_down.shape[1], w_down.shape[0], activation="relu")
    with torch.no_grad():
        for layer, w, b in ((adapter.adapter_down, w_down, b_down), (adapter.adapter_up, w_up, b_up)):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return adapter(h)  # (..., C)


def check_bottleneck_adapter(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                             verbose: bool = True) -> Verdict:
    """fn(h, w_down, b_down, w_up, b_up) -> the output of a Houlsby/Pfeiffer bottleneck adapter with ReLU:
    h (B, T, C); w_down (m, C), b_down (m,); w_up (C, m), b_up (C,) (nn.Linear's weight layout)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        b, t, c, m = _randint(g, 1, 3), _randint(g, 2, 8), _randint(g, 8, 32), _randint(g, 2, 8)
        cases.append((torch.randn(b, t, c, generator=g), torch.randn(m, c, generator=g), torch.randn(m, generator=g),
                      torch.randn(c, m, generator=g), torch.randn(c, generator=g)))
    return _run("bottleneck_adapter", fn, _bottleneck_adapter_reference, cases,
                "h + up(relu(down(h))): project down to m, ReLU, project up to C, then add the input back",
                MISTAKES["bottleneck_adapter"], verbose=verbose)


def _linear(h, w, b):
    return h @ w.T + b



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "soft_prompt_inputs": {
        "masked_out": (_soft_prompt_masked_out, "the virtual tokens must be attended to: their attention_mask "
                                                "entries are 1, not 0"),
        "label_zero": (_soft_prompt_label_zero, "no loss on the virtual tokens: their labels are -100 (the "
                                                "ignore index), not 0, which is a real token id"),
        "appended": (_soft_prompt_appended, "prompt tuning prepends the virtual tokens: they go in front of "
                                            "the input, not after it"),
    },
    "bottleneck_adapter": {
        "no_residual": (lambda h, wd, bd, wu, bu: _linear(torch.relu(_linear(h, wd, bd)), wu, bu),
                        "add the input back (h + ...): the residual connection makes the adapter start as the "
                        "identity when up_proj is zero"),
        "activation_after_up": (lambda h, wd, bd, wu, bu: h + torch.relu(_linear(_linear(h, wd, bd), wu, bu)),
                                "the nonlinearity sits in the bottleneck, between the down and up projections, "
                                "not after the up projection"),
        "no_activation": (lambda h, wd, bd, wu, bu: h + _linear(_linear(h, wd, bd), wu, bu),
                          "without the ReLU between them, down and up collapse into one low-rank linear map"),
    },
}
