"""llmlab.decoding against transformers: every logits processor against its transformers
processor, greedy decoding and beam search against ``generate`` token for token (tiny random Llama
and GPT-2), sampling against the per-step distributions of ``generate``, plus invariants (cached
equals uncached, llmlab's LLM equals the same weights in transformers) and the metrics."""

import math
import warnings
from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmlab.decoding import (
    DecodingModel,
    GenerationConfig,
    LLMAdapter,
    apply_temperature,
    as_decoding_model,
    beam_search,
    continuation_log_probs,
    distinct_n,
    frequency_presence_penalty,
    generate,
    greedy_search,
    mean_log_prob,
    min_new_tokens_rule,
    min_p_filter,
    no_repeat_ngram_ban,
    process_logits,
    repeated_ngram_rate,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)
from tests.models import tiny_llama as shared_tiny_llama
from tests.models import tiny_llmlab

V = 50


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are 20x faster on one thread than on two busy ones; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- tiny models ---------------------------------------------------------------------------------


def tiny_llama(seed):
    return shared_tiny_llama(seed, vocab_size=V, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None
    )
    return GPT2LMHeadModel(config).eval()


MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
_CACHE = {}


def hf_model(kind, seed):
    if (kind, seed) not in _CACHE:
        _CACHE[(kind, seed)] = MAKERS[kind](seed)
    return _CACHE[(kind, seed)]


def prompt(seed, batch=2, length=5):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, V, (batch, length), generator=g)  # (B, T)


def hf_generate(model, ids, config, **extra):
    eos = list(config.eos_ids) if config.eos_ids else None
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        num_return_sequences=config.num_return_sequences,
        length_penalty=config.length_penalty,
        early_stopping=config.early_stopping,
        eos_token_id=eos,
        pad_token_id=config.pad_id,
        return_dict_in_generate=True,
        output_scores=True,
        **extra,
    )


def frequent_token(model, ids, step=3):
    """A token greedy decoding emits early, used as EOS so that sequences really finish."""
    out = greedy_search(model, ids, GenerationConfig(max_new_tokens=step + 1))
    return int(out.sequences[0, ids.shape[1] + step])


# --- scores with ties and -inf -------------------------------------------------------------------


def tricky_scores(seed, rows=4, vocab=24):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g).mul(2).round().div(2)  # (N, V): halves, so many ties
    s[0, :3] = -math.inf
    s[1, ::5] = -math.inf
    s[2] = 0.5  # a fully flat row
    return s


def hf(proc, scores, ids=None):
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long) if ids is None else ids
    return proc(ids, scores.clone())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_equals_transformers(seed, temperature):
    s = tricky_scores(seed)
    exact(apply_temperature(s, temperature), hf(TemperatureLogitsWarper(temperature), s))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [1, 2, 5, 24, 100])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_k_equals_transformers(seed, top_k, keep):
    s = tricky_scores(seed)
    exact(top_k_filter(s, top_k, keep), hf(TopKLogitsWarper(top_k, min_tokens_to_keep=keep), s))


def test_top_k_keeps_ties_and_clips_to_vocab():
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(s, 1)).sum() == 2  # both tied maxima stay
    exact(top_k_filter(s, 10), s)  # k > V keeps everything


def smooth_scores(seed, rows=4, vocab=24):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 2  # (N, V): no ties
    s[0, :3] = -math.inf
    s[1, ::5] = -math.inf
    return s


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_p_equals_transformers(seed, top_p, keep):
    s = smooth_scores(seed)
    exact(top_p_filter(s, top_p, keep), hf(TopPLogitsWarper(top_p, min_tokens_to_keep=keep), s))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 1.0])
def test_top_p_with_ties_keeps_the_same_values_as_transformers_lowest_ids_first(seed, top_p):
    """The documented difference: with ties at the cut both keep the same number of tokens with
    the same scores; ours breaks the tie towards the lowest ids."""
    s = tricky_scores(seed)
    ours, ref = top_p_filter(s, top_p), hf(TopPLogitsWarper(top_p), s)
    for row in range(s.shape[0]):
        kept, kept_ref = ours[row][torch.isfinite(ours[row])], ref[row][torch.isfinite(ref[row])]
        exact(kept.sort().values, kept_ref.sort().values)
        cut = kept.min()
        tied = (s[row] == cut).nonzero()[:, 0]  # ids sharing the boundary score
        n_tied_kept = int(torch.isfinite(ours[row, tied]).sum())
        assert torch.isfinite(ours[row, tied[:n_tied_kept]]).all()  # the lowest ids among the ties
    flat = torch.zeros(1, 10)
    assert torch.isfinite(top_p_filter(flat, 0.3)).nonzero()[:, 1].tolist() == [0, 1, 2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8: stop there
    kept = torch.isfinite(top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]  # needs the third token to reach 0.81
    exact(top_p_filter(probs.log(), 1.0), probs.log())  # top_p = 1 keeps every token with p > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("keep", [1, 2])
def test_min_p_equals_transformers(seed, min_p, keep):
    s = tricky_scores(seed)
    s[3, 0] = 8.0  # a confident row: min-p keeps little there
    exact(min_p_filter(s, min_p, keep), hf(MinPLogitsWarper(min_p, min_tokens_to_keep=keep), s))


def token_history(seed, rows=4, length=12, vocab=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (rows, length), generator=g) * (vocab // 6)  # (N, T): few ids, many repeats


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(seed, penalty):
    s, ids = tricky_scores(seed), token_history(seed)
    exact(repetition_penalty(s, ids, penalty), hf(RepetitionPenaltyLogitsProcessor(penalty), s, ids))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 13])
def test_no_repeat_ngram_equals_transformers(seed, n):
    s = tricky_scores(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (4, 12), generator=g)  # (N, T): 3 ids, so n-grams repeat
    exact(no_repeat_ngram_ban(s, ids, n), hf(NoRepeatNGramLogitsProcessor(n), s, ids))


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_new_tokens_equals_transformers(generated):
    s, prompt_len, eos = tricky_scores(0), 4, [5, 7]
    ids = torch.zeros(4, prompt_len + generated, dtype=torch.long)
    ours = min_new_tokens_rule(s, generated, 3, eos)
    exact(ours, hf(MinNewTokensLengthLogitsProcessor(prompt_len, 3, eos), s, ids))
    exact(ours, hf(MinLengthLogitsProcessor(prompt_len + 3, eos), s, ids))


@pytest.mark.parametrize("freq,pres", [(0.5, 0.0), (0.0, 0.7), (0.4, -0.3), (-1.0, 2.0)])
def test_frequency_presence_penalty_equals_openai_formula(freq, pres):
    s, ids = tricky_scores(1), token_history(1)
    ours = frequency_presence_penalty(s, ids, freq, pres)
    ref = s.clone()
    for row in range(ids.shape[0]):
        for token in set(ids[row].tolist()):
            count = ids[row].tolist().count(token)
            ref[row, token] = s[row, token] - count * freq - pres  # mu[j] - c[j] * a_freq - [c[j] > 0] * a_pres
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_frequency_penalty_grows_with_count_unlike_repetition_penalty():
    s = torch.zeros(1, 4) + 1.0
    once, thrice = torch.tensor([[2]]), torch.tensor([[2, 2, 2]])
    assert frequency_presence_penalty(s, thrice, 0.5, 0.0)[0, 2] < frequency_presence_penalty(s, once, 0.5, 0.0)[0, 2]
    exact(repetition_penalty(s, thrice, 1.5), repetition_penalty(s, once, 1.5))  # applied once per token


def test_process_logits_order_equals_transformers_list():
    s, ids = smooth_scores(3), token_history(3)
    s[:, 0] = 1.0  # keep the EOS id finite before the min-length rule
    config = GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_k=9,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=20,
        eos_token_id=0,
    )
    chain = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            NoRepeatNGramLogitsProcessor(2),
            MinNewTokensLengthLogitsProcessor(5, 20, 0),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(9),
            TopPLogitsWarper(0.9),
            MinPLogitsWarper(0.05),
        ]
    )
    exact(process_logits(s, ids, 5, config, sampling=True), chain(ids, s.clone()))
    greedy = process_logits(s, ids, 5, config, sampling=False)  # penalties only, no warpers
    exact(greedy, LogitsProcessorList(chain[:3])(ids, s.clone()))


# --- parameter errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, r"top_p must be a finite number in \(0"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": 0}, ValueError, "top_k must be an integer >= 1"),
        ({"top_k": 2.5}, TypeError, "top_k must be an integer"),
        ({"min_p": 1.5}, ValueError, "min_p"),
        ({"num_beams": 0}, ValueError, "num_beams must be an integer >= 1"),
        ({"num_beams": 2, "num_return_sequences": 3}, ValueError, "num_return_sequences must be <= num_beams=2"),
        ({"num_return_sequences": 2}, ValueError, "greedy"),
        ({"num_beams": 2, "do_sample": True}, ValueError, "beam sampling"),
        ({"early_stopping": "sometimes"}, ValueError, "early_stopping"),
        ({"early_stopping": 1}, ValueError, "early_stopping"),
        ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
        ({"frequency_penalty": 3.0}, ValueError, "frequency_penalty"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"eos_token_id": -1}, ValueError, "eos_token_id"),
        ({"eos_token_id": ()}, ValueError, "eos_token_id"),
    ],
)
def test_invalid_config_raises_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        GenerationConfig(**kwargs)


def test_invalid_inputs_raise_clear_errors():
    model = hf_model("llama", 0)
    with pytest.raises(ValueError, match=r"input_ids must have 2 dimensions \(B, T\)"):
        greedy_search(model, torch.tensor([1, 2, 3]), GenerationConfig())
    with pytest.raises(TypeError, match="int64"):
        greedy_search(model, torch.ones(1, 3), GenerationConfig())
    with pytest.raises(TypeError, match="config must be a GenerationConfig"):
        generate(model, prompt(0), {"num_beams": 2})
    with pytest.raises(TypeError, match="prefill/step/reorder"):
        as_decoding_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match="input_ids must have one row per row of scores"):
        repetition_penalty(torch.zeros(2, 3), torch.zeros(3, 1, dtype=torch.long), 1.2)


# --- greedy and beam search equal transformers' generate ----------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_eos", [False, True])
def test_greedy_equals_generate(kind, seed, use_eos):
    model, ids = hf_model(kind, seed), prompt(seed, batch=3)
    eos = frequent_token(model, ids) if use_eos else None
    config = GenerationConfig(max_new_tokens=12, eos_token_id=eos)
    ours, ref = greedy_search(model, ids, config), hf_generate(model, ids, config)
    exact(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


BEAM_CASES = [  # (num_beams, length_penalty, early_stopping, num_return_sequences, use_eos)
    (2, 1.0, False, 1, False),
    (4, 1.0, False, 2, True),
    (4, 0.0, True, 4, True),
    (3, 2.0, "never", 2, True),
    (4, -0.5, False, 1, True),
    (2, 1.0, True, 2, True),
    (5, 1.0, "never", 3, False),
]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", BEAM_CASES)
def test_beam_search_equals_generate(kind, seed, case):
    num_beams, lp, early, n_ret, use_eos = case
    model, ids = hf_model(kind, seed), prompt(seed)
    eos = frequent_token(model, ids) if use_eos else None
    config = GenerationConfig.beam(
        num_beams,
        max_new_tokens=10,
        length_penalty=lp,
        early_stopping=early,
        num_return_sequences=n_ret,
        eos_token_id=eos,
    )
    ours, ref = beam_search(model, ids, config), hf_generate(model, ids, config)
    exact(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequence_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)


def test_beam_search_with_two_eos_ids_and_penalties_equals_generate():
    model, ids = hf_model("llama", 3), prompt(3)
    eos = (frequent_token(model, ids, 2), frequent_token(model, ids, 4))
    config = GenerationConfig.beam(
        3,
        max_new_tokens=10,
        eos_token_id=eos,
        pad_token_id=1,
        repetition_penalty=1.4,
        no_repeat_ngram_size=2,
        min_new_tokens=3,
    )
    ref = hf_generate(model, ids, config, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=3)
    exact(beam_search(model, ids, config).sequences, ref.sequences)


def test_beam_scores_are_length_normalized_log_probs():
    model, ids = hf_model("gpt2", 0), prompt(0, batch=1)
    config = GenerationConfig.beam(3, max_new_tokens=8, length_penalty=0.7, num_return_sequences=3)
    out = beam_search(model, ids, config)
    cont = out.sequences[:, ids.shape[1] :]  # (R, L)
    logp = continuation_log_probs(model, ids.expand(3, -1), cont).sum(dim=1)  # (R,)
    torch.testing.assert_close(out.sequence_scores, logp / cont.shape[1] ** 0.7, rtol=1e-5, atol=1e-5)
    assert torch.all(out.sequence_scores[:-1] >= out.sequence_scores[1:])  # best first


class UncachedLM:
    """The DecodingModel interface with no cache: the state is the whole sequence, re-run each step."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, input_ids):
        return self.model(input_ids).logits[:, -1].float(), input_ids

    def step(self, tokens, state):
        return self.prefill(torch.cat([state, tokens[:, None]], dim=1))

    def reorder(self, state, rows):
        return state[rows]


def test_cached_decoding_equals_uncached():
    model, ids = hf_model("llama", 1), prompt(1)
    assert isinstance(UncachedLM(model), DecodingModel)
    for config in (GenerationConfig(max_new_tokens=8), GenerationConfig.beam(3, max_new_tokens=8)):
        exact(generate(model, ids, config).sequences, generate(UncachedLM(model), ids, config).sequences)


KNOBS = [{"temperature": 0.3}, {"temperature": 1.7, "top_k": 3, "top_p": 0.5, "min_p": 0.2}]


@pytest.mark.parametrize("knobs", KNOBS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampling_knobs_change_nothing_without_sampling_like_generate(kind, knobs):
    """do_sample=False: temperature and truncation are skipped by greedy decoding and beam search,
    in llmlab and in transformers' generate (which warns that it ignores them)."""
    model, ids = hf_model(kind, 0), prompt(0)
    eos = frequent_token(model, ids)
    for plain in (GenerationConfig(max_new_tokens=8, eos_token_id=eos),
                  GenerationConfig.beam(3, max_new_tokens=8, num_return_sequences=2, eos_token_id=eos)):
        tuned = replace(plain, **knobs)
        ours = generate(model, ids, tuned)
        exact(ours.sequences, generate(model, ids, plain).sequences)
        exact(ours.sequences, hf_generate(model, ids, plain, do_sample=False, **knobs).sequences)
    # the knobs are not inert: with sampling on, the same config reshapes the scores
    scores = torch.randn(2, V, generator=torch.Generator().manual_seed(0))  # (N, V)
    warped = process_logits(scores, ids, ids.shape[1], tuned, sampling=True)
    assert not torch.equal(warped, process_logits(scores, ids, ids.shape[1], tuned, sampling=False))


def test_beam_width_one_without_eos_is_greedy():
    model, ids = hf_model("gpt2", 2), prompt(2)
    exact(
        beam_search(model, ids, GenerationConfig(max_new_tokens=9)).sequences,
        greedy_search(model, ids, GenerationConfig(max_new_tokens=9)).sequences,
    )


# --- sampling --------------------------------------------------------------------------------


SAMPLING = {
    "do_sample": True,
    "temperature": 0.8,
    "top_k": 20,
    "top_p": 0.9,
    "min_p": 0.02,
    "repetition_penalty": 1.2,
    "no_repeat_ngram_size": 3,
}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampling_uses_the_same_per_step_distributions_as_generate(kind):
    """Let transformers sample a sequence, then check that at every prefix our processed scores
    equal the scores generate sampled from."""
    model, ids = hf_model(kind, 0), prompt(0, batch=3)
    config = GenerationConfig(max_new_tokens=10, **SAMPLING)
    torch.manual_seed(0)
    ref = hf_generate(model, ids, config, **{k: v for k, v in SAMPLING.items()})
    for i, ref_scores in enumerate(ref.scores):
        prefix = ref.sequences[:, : ids.shape[1] + i]  # (B, T + i)
        logits = model(prefix).logits[:, -1].float()  # (B, V)
        ours = process_logits(logits, prefix, ids.shape[1], config, sampling=True)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref_scores))
        torch.testing.assert_close(ours.softmax(-1), ref_scores.softmax(-1), rtol=1e-5, atol=1e-6)


def test_sample_records_the_distribution_it_drew_from():
    model, ids = hf_model("llama", 1), prompt(1, batch=2)
    config = GenerationConfig(max_new_tokens=6, **SAMPLING)
    out = sample(model, ids, config, generator=torch.Generator().manual_seed(0))
    for i, scores in enumerate(out.scores):
        prefix = out.sequences[:, : ids.shape[1] + i]
        logits = model(prefix).logits[:, -1].float()
        torch.testing.assert_close(scores, process_logits(logits, prefix, ids.shape[1], config, True))
        drawn = out.sequences[:, ids.shape[1] + i]
        assert torch.isfinite(scores.gather(1, drawn[:, None])).all()  # never a filtered token


def test_sampling_frequencies_match_probabilities():
    model, ids = hf_model("gpt2", 1), prompt(1, batch=1)
    config = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=1.5, top_k=12, num_return_sequences=4000)
    out = sample(model, ids, config, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(out.sequences[:, -1], minlength=V).double()
    logits = model(ids).logits[:, -1].float()
    ref = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(12)])(ids, logits)
    expected = ref.softmax(-1)[0].double() * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the top-k
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # about 6 standard deviations of a chi-square


def test_sampling_is_reproducible_with_a_generator():
    model, ids = hf_model("llama", 0), prompt(0)
    config = GenerationConfig(max_new_tokens=8, do_sample=True, num_return_sequences=2)
    a = sample(model, ids, config, generator=torch.Generator().manual_seed(5)).sequences
    b = sample(model, ids, config, generator=torch.Generator().manual_seed(5)).sequences
    exact(a, b)
    assert a.shape == (4, ids.shape[1] + 8)


# --- llmlab's LLM ----------------------------------------------------------------------------


def tiny_llm(seed):
    return tiny_llmlab(seed, vocab_size=V)


def test_llm_adapter_cached_equals_uncached():
    model, ids = tiny_llm(0), prompt(0)
    assert isinstance(as_decoding_model(model), LLMAdapter)
    for config in (
        GenerationConfig(max_new_tokens=8),
        GenerationConfig.beam(3, max_new_tokens=8, num_return_sequences=2),
        GenerationConfig(max_new_tokens=8, **SAMPLING),
    ):
        ours = generate(model, ids, config, generator=torch.Generator().manual_seed(0)).sequences
        ref = generate(UncachedLM(model), ids, config, generator=torch.Generator().manual_seed(0)).sequences
        exact(ours, ref)


def test_llm_decoding_equals_generate_on_converted_model():
    interop = pytest.importorskip("llmlab.interop")
    model, ids = tiny_llm(1), prompt(1)
    hf_twin = interop.to_hf(model).eval()
    eos = frequent_token(model, ids)
    for config in (
        GenerationConfig(max_new_tokens=10, eos_token_id=eos),
        GenerationConfig.beam(4, max_new_tokens=10, eos_token_id=eos, num_return_sequences=2),
    ):
        exact(generate(model, ids, config).sequences, hf_generate(hf_twin, ids, config).sequences)


# --- metrics ---------------------------------------------------------------------------------


def test_distinct_n_and_repeated_ngram_rate():
    assert distinct_n([[1, 2, 3, 4]], 2) == 1.0
    assert distinct_n([[1, 2, 1, 2, 1, 2]], 2) == 2 / 5
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5  # counted over the whole set of generations
    assert distinct_n([[1]], 2) == 0.0
    assert repeated_ngram_rate([5, 6, 7, 8], 2) == 0.0
    assert repeated_ngram_rate([1, 2, 1, 2, 1, 2], 2) == 3 / 5
    assert repeated_ngram_rate(torch.tensor([4, 4, 4, 4]), 1) == 3 / 4


def test_mean_log_prob_equals_full_forward():
    model, ids = hf_model("llama", 0), prompt(0)
    cont = prompt(7, batch=2, length=6)
    full = torch.cat([ids, cont], dim=1)
    logp = model(full).logits.float().log_softmax(-1)[:, ids.shape[1] - 1 : -1]  # (B, L, V)
    ref = logp.gather(2, cont[:, :, None])[:, :, 0].mean(dim=1)
    torch.testing.assert_close(mean_log_prob(model, ids, cont), ref, rtol=1e-5, atol=1e-5)


def test_shipped_model_beam_search_equals_generate_on_its_transformers_twin():
    checkpoint = pytest.importorskip("llmlab.checkpoint")
    if "tiny-char" not in checkpoint.shipped_checkpoints():
        pytest.skip("the shipped checkpoint is not present")
    interop = pytest.importorskip("llmlab.interop")
    model, tokenizer = checkpoint.load_pretrained()
    hf_twin = interop.to_hf(model.eval())
    ids = torch.tensor([tokenizer.encode("Once upon a time"), tokenizer.encode("The little dog w")])  # (2, 16)
    eos = tokenizer.encode(".")[0]
    for config in (
        GenerationConfig(max_new_tokens=24, eos_token_id=eos),
        GenerationConfig.beam(4, max_new_tokens=24, eos_token_id=eos, num_return_sequences=2),
    ):
        exact(generate(model, ids, config).sequences, hf_generate(hf_twin, ids, config).sequences)


def test_llm_adapter_warns_once_when_decoding_past_block_size():
    import warnings

    model = tiny_llm(0)  # block_size 32
    ids = torch.randint(0, V, (1, 30))
    with pytest.warns(UserWarning, match="past the model's block_size=32"):
        greedy_search(model, ids, GenerationConfig(max_new_tokens=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no warning
        greedy_search(model, ids[:, :10], GenerationConfig(max_new_tokens=6))
