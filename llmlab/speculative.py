"""Speculative decoding: a cheap draft model proposes k tokens, the target verifies them at once.

What it implements
- ``probs_from_logits``: next-token probabilities at a temperature; temperature 0 gives the one-hot
  argmax, so greedy decoding is the same accept/resample rule with one-hot distributions.
- ``residual_distribution``: norm(max(0, p - q)), the distribution a rejected position is
  resampled from (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
  Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding with
  Speculative Sampling", Algorithm 2).
- ``emitted_distribution``: the exact distribution of the token emitted at one draft position,
  by enumerating every draft token x: q(x) * [accept x with prob min(1, p(x)/q(x)), otherwise
  resample from the residual]. It equals the target distribution p for every q (the theorem).
- ``verify``: the accept/resample rule over k drafted tokens given the target's k + 1 next-token
  distributions (one forward pass of the target over the drafted block).
- ``speculative_generate``: the whole loop for one sequence, with counts of target and draft
  forward passes and of accepted tokens; ``autoregressive_generate``: the target alone, the same
  way (the baseline of the speed-up).
- ``expected_tokens_per_step`` and ``expected_speedup``: Leviathan et al. eq. 1 and Theorem 3.8,
  (1 - alpha^(k+1)) / (1 - alpha) tokens per target pass and that divided by (k c + 1), where
  alpha is the acceptance rate and c the cost of one draft pass relative to one target pass.
- ``chi_square_sf``: the chi-square survival function (the p-value of Pearson's test), used to
  test sampled outputs against the exact target distribution.

Models are any callables ``model(input_ids (1, T)) -> object with .logits (1, T, V)`` (llmlab
``LLM`` and transformers causal LMs both are). The loop recomputes the full prefix every pass (no
KV cache), for the draft and the target alike, so the pass counts are the honest cost model; a
serving system would keep and roll back KV caches instead. Leaves out: batching sequences with
different acceptance lengths, tree drafts (SpecInfer, Medusa), and the adaptive draft length of
transformers' assisted generation (it does not change greedy outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmlab.shapes import check_float, check_int, check_tensor


def probs_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits (..., V) -> float64 probabilities (..., V); temperature 0 = one-hot argmax (greedy).

    >>> probs_from_logits(torch.tensor([1.0, 3.0, 2.0]), 0.0).tolist()
    [0.0, 1.0, 0.0]
    """
    check_tensor("logits", logits)
    temperature = check_float("temperature", temperature, low=0.0)
    logits = logits.double()
    if temperature == 0.0:
        one_hot = torch.zeros_like(logits)  # (..., V)
        return one_hot.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.softmax(logits / temperature, dim=-1)  # (..., V)


def _check_pq(p: torch.Tensor, q: torch.Tensor) -> None:
    check_tensor("p", p)
    check_tensor("q", q)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape (..., V), got {tuple(p.shape)} and {tuple(q.shape)}")


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis (..., V); where p == q (nothing to fix) it returns p.

    >>> residual_distribution(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])).tolist()
    [0.0, 1.0]
    """
    _check_pq(p, q)
    excess = (p - q).clamp(min=0)  # (..., V): the mass the draft under-proposes
    total = excess.sum(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(total > 0, excess / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def emitted_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact distribution (V,) of the token emitted at a draft position, by enumerating the draft token.

    P(emit y) = sum_x q(x) [1{y = x} a(x) + (1 - a(x)) r(y)], a(x) = min(1, p(x)/q(x)),
    r = residual_distribution(p, q). The result is p itself (up to rounding) for any q.

    >>> p, q = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.3, 0.1])
    >>> torch.allclose(emitted_distribution(p, q), p)
    True
    """
    _check_pq(p, q)
    if p.dim() != 1:
        raise ValueError(f"p and q must be single distributions (V,), got shape {tuple(p.shape)}")
    ratio = torch.where(q > 0, p / q.clamp(min=torch.finfo(q.dtype).tiny), torch.ones_like(p))  # (V,)
    accept = ratio.clamp(max=1.0)  # (V,): a(x)
    r = residual_distribution(p, q)  # (V,)
    out = torch.zeros_like(p)  # (V,)
    for x in range(p.shape[0]):  # enumerate what the draft proposes
        out[x] += q[x] * accept[x]
        out += q[x] * (1 - accept[x]) * r
    return out


def verify(
    p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Accept/resample k drafted tokens: (number accepted n, the token emitted after them).

    p (k+1, V): target distributions after each drafted prefix (the last one follows all k tokens);
    q (k, V): the draft distributions the tokens were sampled from; draft_tokens (k,).
    Token i is accepted with probability min(1, p_i(x_i)/q_i(x_i)); the first rejection emits a
    sample of the residual norm(max(0, p_i - q_i)) and stops; if all k pass, a (k+1)-th token is
    sampled from p_k. With one-hot p and q (greedy), acceptance means "the target's argmax".
    """
    check_tensor("p", p, ndim=2, layout="(k+1, V)")
    check_tensor("q", q, ndim=2, layout="(k, V)")
    check_tensor("draft_tokens", draft_tokens, ndim=1, layout="(k,)")
    k = draft_tokens.shape[0]
    if q.shape[0] != k or p.shape[0] != k + 1 or p.shape[1] != q.shape[1]:
        raise ValueError(f"need p (k+1, V), q (k, V) for k={k} draft tokens, got p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}")
    u = torch.rand(k, generator=generator, dtype=torch.float64)  # (k,)
    for i in range(k):
        x = int(draft_tokens[i])
        if u[i] * q[i, x] < p[i, x]:  # u < p/q without dividing (q(x) > 0: x was sampled from q)
            continue
        r = residual_distribution(p[i], q[i])  # (V,)
        return i, int(torch.multinomial(r.float(), 1, generator=generator))
    return k, int(torch.multinomial(p[k].float(), 1, generator=generator))


def _next_probs(model, ids: torch.Tensor, last: int, temperature: float) -> torch.Tensor:
    """Probabilities (last, V) for the positions after the final ``last`` tokens of ids (1, T)."""
    logits = model(ids).logits[0, -last:]  # (last, V)
    return probs_from_logits(logits, temperature)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.float(), 1, generator=generator))


@dataclass
class SpeculativeOutput:
    """Tokens and counts of one speculative (or plain autoregressive) generation."""

    tokens: torch.Tensor  # (1, T + max_new_tokens): prompt and generated tokens
    target_calls: int  # forward passes of the target
    draft_calls: int  # forward passes of the draft
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted in each verification
    drafted: list[int] = field(default_factory=list)  # tokens drafted in each verification

    @property
    def acceptance_rate(self) -> float:
        """Per-token acceptance rate alpha: accepted / verified drafted tokens (0.0 if none).

        A verification stops at its first rejection, so the tokens drafted after it are never
        tested; they count neither as accepted nor as rejected (Leviathan et al.'s alpha).
        """
        rejected = sum(1 for n, k in zip(self.accepted, self.drafted, strict=True) if n < k)
        tested = sum(self.accepted) + rejected
        return sum(self.accepted) / tested if tested else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """Generated tokens per forward pass of the target (1.0 for plain decoding)."""
        return (self.tokens.shape[1] - self._prompt_len) / self.target_calls

    _prompt_len: int = 0


def _check_generate(input_ids: torch.Tensor, max_new_tokens: int, temperature: float) -> None:
    check_tensor("input_ids", input_ids, ndim=2, layout="(1, T)")
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one non-empty prompt (1, T), got {tuple(input_ids.shape)}")
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_float("temperature", temperature, low=0.0)


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Generate ``max_new_tokens`` tokens from ``target`` with ``draft`` proposing k at a time.

    input_ids (1, T) -> SpeculativeOutput with tokens (1, T + max_new_tokens). The output follows the
    target's distribution at ``temperature`` exactly (temperature 0: the target's greedy tokens).
    """
    _check_generate(input_ids, max_new_tokens, temperature)
    k = check_int("k", k, minimum=1)
    ids = input_ids
    out = SpeculativeOutput(tokens=ids, target_calls=0, draft_calls=0, _prompt_len=input_ids.shape[1])
    while ids.shape[1] - input_ids.shape[1] < max_new_tokens:
        kk = min(k, max_new_tokens - (ids.shape[1] - input_ids.shape[1]) - 1)
        block, qs = ids, []
        for _ in range(kk):  # the draft proposes kk tokens one by one
            q = _next_probs(draft, block, 1, temperature)[0]  # (V,)
            block = torch.cat([block, torch.tensor([[_sample(q, generator)]])], dim=1)  # (1, T')
            qs.append(q)
        out.draft_calls += kk
        p = _next_probs(target, block, kk + 1, temperature)  # (kk+1, V): one target pass
        out.target_calls += 1
        drafted = block[0, ids.shape[1]:]  # (kk,)
        q_all = torch.stack(qs) if qs else p.new_zeros(0, p.shape[1])  # (kk, V)
        n, nxt = verify(p, q_all, drafted, generator)
        ids = torch.cat([ids, drafted[None, :n], torch.tensor([[nxt]])], dim=1)  # (1, T + n + 1)
        if kk:
            out.accepted.append(n)
            out.drafted.append(kk)
    out.tokens = ids
    return out


@torch.no_grad()
def autoregressive_generate(
    model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """The target alone, one full forward pass per token (the baseline of the speed-up)."""
    _check_generate(input_ids, max_new_tokens, temperature)
    ids = input_ids
    for _ in range(max_new_tokens):
        p = _next_probs(model, ids, 1, temperature)[0]  # (V,)
        ids = torch.cat([ids, torch.tensor([[_sample(p, generator)]])], dim=1)  # (1, T + 1)
    return SpeculativeOutput(tokens=ids, target_calls=max_new_tokens, draft_calls=0,
                             _prompt_len=input_ids.shape[1])


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): mean tokens per target pass (Leviathan et al. 2023, eq. 1).

    >>> expected_tokens_per_step(0.5, 2)
    1.75
    """
    alpha = check_float("alpha", alpha, 0.0, 1.0)
    k = check_int("k", k, minimum=0)
    if alpha == 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Expected wall-time speed-up (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)) (Leviathan et al., Thm 3.8).

    c: time of one draft pass / time of one target pass.

    >>> round(expected_speedup(0.8, 4, 0.05), 3)
    2.801
    """
    c = check_float("c", c, low=0.0)
    return expected_tokens_per_step(alpha, k) / (k * c + 1)


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(chi2_dof >= statistic) = Q(dof/2, statistic/2) (regularized upper incomplete gamma).

    >>> round(chi_square_sf(3.841, 1), 3)
    0.05
    """
    statistic = check_float("statistic", statistic, low=0.0)
    dof = check_int("dof", dof, minimum=1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's test of observed ``counts`` (N,) against expected ``probs`` (N,): (statistic, p-value).

    Cells with zero expected probability must have zero counts (else the p-value is 0).
    """
    check_tensor("counts", counts, ndim=1, layout="(N,)")
    check_tensor("probs", probs, ndim=1, layout="(N,)")
    if counts.shape != probs.shape:
        raise ValueError(f"counts and probs must have the same shape, got {tuple(counts.shape)} and "
                         f"{tuple(probs.shape)}")
    n = counts.sum().double()
    expected = probs.double() * n  # (N,)
    live = expected > 0
    if bool((counts[~live] > 0).any()):
        return float("inf"), 0.0
    stat = float(((counts.double()[live] - expected[live]) ** 2 / expected[live]).sum())
    return stat, chi_square_sf(stat, int(live.sum()) - 1)
