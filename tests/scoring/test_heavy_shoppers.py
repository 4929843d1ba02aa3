"""Heavy shoppers cost the same answer by a cheaper path: EASE's dense GEMM for rows that hold a
good share of the catalog, and the batch's style profiles from one sparse x dense product.

Both are compared with the straightforward computation written out here (the code before the
change), so a regression in either path shows as a difference, not as agreement with itself.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from libs.common.style_math import centre
from services.scoring.models import ease
from services.scoring.models.base import top_k_rows
from services.scoring.style_profile import StyleProfile, compute_profile, compute_profiles


def _model(n: int, seed: int = 3) -> ease.EASE:
    rng = np.random.default_rng(seed)
    m = ease.EASE()
    m.B = rng.standard_normal((n, n)).astype(np.float32)
    np.fill_diagonal(m.B, 0.0)
    m.n_items = n
    return m


def _rows(n: int, sizes: list[int], seed: int = 5) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    indptr, cols = [0], []
    for h in sizes:
        cols.extend(sorted(rng.choice(n, size=h, replace=False).tolist()))
        indptr.append(len(cols))
    data = rng.uniform(0.1, 3.0, size=len(cols)).astype(np.float32)
    return sp.csr_matrix((data, np.asarray(cols), np.asarray(indptr)), shape=(len(sizes), n))


def test_ease_dense_rows_score_as_the_sparse_product() -> None:
    n = 400
    m = _model(n)
    # Light rows and rows past 1/16 of the catalog, enough of them to take the dense path.
    sizes = [3, 10, 30, 40, 60, 90, 120, 7, 250]
    rows = _rows(n, sizes)
    assert ease.dense_rows(np.diff(rows.indptr), n).tolist() == [s * 16 >= n for s in sizes]
    want = np.asarray((rows > 0).astype(np.float32) @ m.B)
    got = m.score(rows)
    assert got.dtype == np.float32 and got.shape == (len(sizes), n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert top_k_rows(got, 20).tolist() == top_k_rows(want, 20).tolist()
    # Alone, even the heaviest row is not worth a pass over B: the sparse product, same values.
    assert not ease.dense_rows(np.diff(rows[8].indptr), n).any()
    for r in (8, 0):
        np.testing.assert_allclose(m.score(rows[r]), want[r : r + 1], rtol=1e-5, atol=1e-4)


def _reference_profile(
    history: dict[str, float], embeddings: dict[str, np.ndarray], half: float, centroid: np.ndarray | None
) -> StyleProfile | None:
    used = [(item, w) for item, w in history.items() if item in embeddings and w > 0]
    if not used:
        return None
    W = float(sum(w for _, w in used))
    vecs = centre(np.stack([embeddings[item] for item, _ in used]), centroid).astype(np.float64)
    acc = np.array([w / W for _, w in used]) @ vecs
    coherence = float(np.linalg.norm(acc))
    if coherence < 1e-9:
        return None
    return StyleProfile(
        vector=(acc / coherence).astype(np.float32),
        confidence=float(min(1.0, max(0.0, (1.0 - 2.0 ** (-W / half)) * coherence))),
        anchor=max(used, key=lambda iw: (iw[1], iw[0]))[0],
        items_used=len(used),
        centred=centroid is not None,
    )


def test_batch_profiles_equal_each_users_own() -> None:
    rng = np.random.default_rng(11)
    items = [f"i{j:03d}" for j in range(300)]
    embeddings = {i: rng.standard_normal(16).astype(np.float32) for i in items[:250]}  # 50 without a photo
    histories: dict[str, dict[str, float]] = {
        "heavy": {i: float(rng.uniform(0.01, 5.0)) for i in items},
        "light": {"i001": 2.0, "i270": 1.0},
        "photoless": {"i260": 3.0, "i299": 1.0},
        "tied": {"i005": 2.0, "i009": 2.0, "i002": 1.0},  # the anchor is the larger id of the tie
        "zero": {"i004": 0.0},
        "empty": {},
    }
    centroid = (rng.standard_normal(16) * 0.1).astype(np.float32)
    for c in (None, centroid):
        batch = compute_profiles(histories, embeddings, 5.0, c)
        assert list(batch) == list(histories)
        for user, history in histories.items():
            want = _reference_profile(history, embeddings, 5.0, c)
            got = batch[user]
            alone = compute_profile(history, embeddings, 5.0, c)
            if want is None:
                assert got is None and alone is None, user
                continue
            assert got is not None and alone is not None
            for p in (got, alone):
                assert (p.anchor, p.items_used, p.centred) == (want.anchor, want.items_used, want.centred), user
                np.testing.assert_allclose(p.vector, want.vector, rtol=1e-5, atol=1e-6)
                assert abs(p.confidence - want.confidence) < 1e-9
    assert batch["tied"] is not None and batch["tied"].anchor == "i009"


def test_stored_weights_with_their_scale_give_the_decayed_answer() -> None:
    """The consumer folds in from stored weights and one factor (InteractionState.stored_histories);
    every model and the style profile must see exactly what the decayed weights give."""
    from services.scoring.foldin import ModelHolder, Recommender
    from services.scoring.interactions import EventRecord, InteractionState
    from services.scoring.models import ALGORITHMS
    from services.scoring.trainer import fit_model

    rng = np.random.default_rng(2)
    state = InteractionState({1: 1.0, 4: 5.0}, half_life_s=86400.0)
    t0 = 1_750_000_000.0
    state.apply_all(
        EventRecord(f"e{n}", f"u{rng.integers(30)}", f"i{rng.integers(60)}", int(rng.choice([1, 4])), t0 + 3600.0 * n)
        for n in range(900)
    )
    users = state.users()
    stored, scale = state.stored_histories(users)
    assert scale < 1.0  # the events span days: the factor matters
    decayed = state.histories(users)
    for u in users:
        assert stored[u].keys() == decayed[u].keys()
        for i, w in stored[u].items():
            assert w * scale == decayed[u][i]
    for algorithm in sorted(ALGORITHMS):
        holder = ModelHolder()
        holder.swap(fit_model(state, algorithm, {}))
        engine = Recommender(state, holder)
        want = engine.top_n_many(users, 10, histories=decayed)
        got = engine.top_n_many(users, 10, histories=stored, scale=scale)
        for u in users:
            assert [i for i, _ in got[u].items] == [i for i, _ in want[u].items], (algorithm, u)
            # ALS solves each batch's users together (float32): the last digits move (test_batched_foldin).
            rtol = 1e-3 if algorithm == "als" else 1e-6
            np.testing.assert_allclose(
                [s for _, s in got[u].items], [s for _, s in want[u].items], rtol=rtol, atol=1e-6
            )
    embeddings = {f"i{j}": rng.standard_normal(8).astype(np.float32) for j in range(0, 60, 2)}
    want_p = compute_profiles(decayed, embeddings, 2.0)
    got_p = compute_profiles(stored, embeddings, 2.0, scale=scale)
    for u in users:
        a, b = got_p[u], want_p[u]
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert (a.anchor, a.items_used) == (b.anchor, b.items_used)
            np.testing.assert_allclose(a.vector, b.vector, rtol=1e-5, atol=1e-6)
            assert abs(a.confidence - b.confidence) < 1e-9
