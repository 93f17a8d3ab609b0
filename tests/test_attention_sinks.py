"""llmlab.attention_sinks: the rolling cache against the ordinary KV cache, and its eviction rule."""

import pytest
import torch

from llmlab.attention_sinks import SinkCache, sliding_window_logits, streaming_logits
from llmlab.model import LLM, ModelConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LLM(ModelConfig.tiny(vocab_size=40)).eval()


def test_no_eviction_equals_the_ordinary_cache(model):
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(1))
    streamed = streaming_logits(model, ids, n_sink=4, window=16)  # capacity 20 = T: nothing evicted
    cache = model.new_cache()
    with torch.no_grad():
        stepped = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(20)], dim=1)
        full = model(ids).logits
    torch.testing.assert_close(streamed, stepped, rtol=0, atol=1e-6)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)


def test_eviction_keeps_exactly_the_sinks_and_the_last_window():
    cache = SinkCache(n_layer=2, n_sink=3, window=5)
    for t in range(17):
        kv = torch.full((1, 1, 1, 2), float(t))  # each token's key and value hold its index
        keys, values = cache.update(0, kv, kv + 100)
        expected = list(range(min(t + 1, 3))) + [i for i in range(max(3, t - 4), t + 1)]
        assert cache.token_index[0] == expected
        assert keys[0, 0, :, 0].tolist() == [float(i) for i in expected]
        assert values[0, 0, :, 0].tolist() == [float(i) + 100 for i in expected]
    assert keys.shape[2] == cache.capacity == 8
    assert cache.token_index[1] == []  # layers are independent


def test_eviction_changes_the_logits_only_after_the_cache_fills(model):
    ids = torch.randint(0, 40, (1, 24), generator=torch.Generator().manual_seed(2))
    full = streaming_logits(model, ids, n_sink=2, window=22)
    rolled = streaming_logits(model, ids, n_sink=2, window=10)
    torch.testing.assert_close(rolled[:, :12], full[:, :12], rtol=0, atol=1e-6)
    assert (rolled[:, 12:] - full[:, 12:]).abs().max() > 1e-4


def test_sliding_window_reference(model):
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(3))
    ref = sliding_window_logits(model, ids, window=8, batch=7)
    with torch.no_grad():
        torch.testing.assert_close(ref[:, :8], model(ids[:, :8]).logits, rtol=0, atol=1e-6)
        for t in (8, 17, 29):
            torch.testing.assert_close(ref[:, t], model(ids[:, t - 7:t + 1]).logits[:, -1], rtol=0, atol=1e-5)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="n_sink"):
        SinkCache(1, -1, 4)
    with pytest.raises(ValueError, match="layer_idx"):
        SinkCache(1, 1, 4).update(1, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="same shape"):
        SinkCache(1, 1, 4).update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2))
    cache = SinkCache(1, 1, 4)
    cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="does not continue the cached"):  # batch 1 cached, batch 2 appended
        cache.update(0, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    alibi = LLM(ModelConfig(vocab_size=10, n_layer=1, n_embd=16, n_head=2, n_kv_head=2, ffn_hidden=32,
                            position="alibi"))
    with pytest.raises(ValueError, match="position='rope'"):
        streaming_logits(alibi, torch.zeros(1, 3, dtype=torch.long), 1, 2)


def test_committed_result_has_the_layout_notebook_20_reads():
    from llmlab.notebook import load_result

    rec = load_result("modern_sinks")
    assert rec["command"] == "python scripts/modern_sinks.py"
    assert len(rec["first_token_attention"]) == 4 and 0 < rec["uniform_attention"] < 1
    for w in ("128", "64", "32"):
        row = rec["by_window"][w]
        assert set(row) == {"reference", "sink0", "sink1", "sink4"}
        assert all(len(r["far_by_row"]) == rec["rows"] and r["far_mean"] > 0 for r in row.values())
        # before any eviction every variant is the same model on the same tokens
        early = [r["early_mean"] for r in row.values()]
        assert max(early) - min(early) < 1e-4
