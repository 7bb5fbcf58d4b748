"""embkern's quaternion scoring agrees with PyKEEN's QuatE.

PyKEEN (1.11) ``QuatEInteraction.forward`` is ``-einsum("...di,...dj,...dk,ijk->...",
h, r, t, table)`` on ``(d, 4)`` interleaved tensors, ``table`` the quaternion
multiplication table: the NEGATED inner product <h (x) r, t>, and it does NOT
normalise r; the ``QuatE`` model normalises relations beforehand with
``pykeen.nn.quaternion.normalize`` (the Euclidean 4-norm per coordinate), its
default ``relation_normalizer``. So embkern's
``score_all(layout="interleaved", normalize_relation=True)`` must equal
``-QuatEInteraction(h, normalize(r), t)``.

The PyKEEN tests need an importable pykeen; in a venv that already has torch,
this is enough (22 small packages, torch untouched)::

    python -m pip install --no-deps pykeen==1.11.1 class-resolver docdata more-click \
        more-itertools pystow torch-max-mem torch-ppr pyyaml requests urllib3 idna certifi \
        charset-normalizer click tabulate pandas scipy scikit-learn joblib threadpoolctl \
        cloudpickle narwhals

``test_pykeen_formula_without_pykeen`` re-derives the same formula from PyKEEN's
multiplication table and runs without pykeen.
"""

import pytest
import torch

import embkern
from embkern.reference.hypercomplex import to_layout

PYKEEN_IMPORT = ("pip install --no-deps pykeen==1.11.1 class-resolver docdata more-click more-itertools pystow "
                 "torch-max-mem torch-ppr pyyaml requests urllib3 idna certifi charset-normalizer click tabulate "
                 "pandas scipy scikit-learn joblib threadpoolctl cloudpickle narwhals")


def _pykeen():
    try:
        from pykeen.nn import quaternion
        from pykeen.nn.modules import QuatEInteraction
    except Exception as exc:  # ImportError, or a missing transitive dependency
        pytest.skip(f"pykeen.nn.modules is not importable ({type(exc).__name__}: {exc}); "
                    f"install with `{PYKEEN_IMPORT}`")
    return QuatEInteraction, quaternion


def _tables(B, N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, 4, generator=g, dtype=torch.float64).to(dtype) for n in (B, B, N))


def _pk_scores(QuatEInteraction, h, r, E):
    inter = QuatEInteraction().to(h.dtype)
    with torch.no_grad():
        return inter.score_t(h=h, r=r, all_entities=E)


def _flat(x):
    return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("B,N,d", [(1, 1, 1), (7, 13, 5), (33, 120, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_all_matches_quate_interaction(B, N, d, dtype):
    QuatEInteraction, quaternion = _pykeen()
    h, r, E = _tables(B, N, d, dtype)
    r_hat = quaternion.normalize(_flat(r)).reshape(r.shape)
    pk = _pk_scores(QuatEInteraction, h, r_hat, E)
    assert pk.shape == (B, N)
    ours = embkern.score_all(_flat(h), _flat(r), _flat(E), algebra="quaternion", score="inner",
                             layout="interleaved")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * d)
    torch.testing.assert_close(ours, -pk, **tol)  # PyKEEN returns the negation
    # The component-major default layout gives the same scores on converted tables.
    comp = embkern.score_all(*(to_layout(_flat(x), "interleaved", "component") for x in (h, r, E)))
    torch.testing.assert_close(comp, -pk, **tol)


def test_interaction_does_not_normalise_relation():
    QuatEInteraction, quaternion = _pykeen()
    h, r, E = _tables(6, 9, 4, torch.float64, seed=1)
    r = 3.0 * r  # far from unit length, so normalising matters
    pk_raw = _pk_scores(QuatEInteraction, h, r, E)
    raw = embkern.score_all(_flat(h), _flat(r), _flat(E), normalize_relation=False, layout="interleaved")
    hat = embkern.score_all(_flat(h), _flat(r), _flat(E), normalize_relation=True, layout="interleaved")
    torch.testing.assert_close(raw, -pk_raw, rtol=1e-10, atol=1e-10)
    assert float((hat + pk_raw).abs().max()) > 1.0
    # PyKEEN's normaliser is the per-coordinate Euclidean 4-norm, as embkern's.
    torch.testing.assert_close(
        quaternion.normalize(_flat(r)),
        embkern.reference.hypercomplex.normalize_relation(_flat(r), "interleaved"))


def test_quate_model_default_normaliser_is_quaternion_normalize():
    _, quaternion = _pykeen()
    import inspect

    try:
        from pykeen.models import QuatE as PKQuatE
    except Exception as exc:
        pytest.skip(f"pykeen.models is not importable ({type(exc).__name__}: {exc})")
    default = inspect.signature(PKQuatE.__init__).parameters["relation_normalizer"].default
    assert default is quaternion.normalize


def test_quate_module_matches_pykeen():
    """embkern.nn.QuatE's 1-vs-all scores = -PyKEEN on the same tables, re-laid out."""
    QuatEInteraction, quaternion = _pykeen()
    m = embkern.nn.QuatE(10, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        m.entity.normal_()
    h = torch.tensor([0, 3, 9, 4])
    r = torch.tensor([0, 5, 2, 1])

    def inter(x):
        return to_layout(x.detach(), "component", "interleaved").reshape(x.shape[0], -1, 4)

    E, Rl = inter(m.entity), inter(m.relation)
    r_hat = quaternion.normalize(_flat(Rl[r])).reshape(len(r), -1, 4)
    pk = _pk_scores(QuatEInteraction, E[h], r_hat, E)
    torch.testing.assert_close(m.score_t(h, r).detach(), -pk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ties", ["optimistic", "realistic", "pessimistic"])
def test_filtered_ranks_match_pykeen_ranks(ties):
    """rank_all's tie policies and filtering = pykeen.evaluation.ranks.Ranks on NaN-filtered scores."""
    QuatEInteraction, quaternion = _pykeen()
    try:
        from pykeen.evaluation.ranks import Ranks
    except Exception as exc:
        pytest.skip(f"pykeen.evaluation is not importable ({type(exc).__name__}: {exc})")
    B, N, d = 12, 40, 3
    h, r, E = _tables(B, N, d, torch.float64, seed=2)
    E[7] = E[3]  # exact ties: entities 3 and 7 always score equally
    E[20] = E[3]
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, N, (B,), generator=g)
    targets[:4] = 3
    filt = [sorted(set(torch.randint(0, N, (5,), generator=g).tolist()) - {int(targets[b])}) for b in range(B)]
    filt[1] = [7]  # filtering one tie partner of the target
    ours = embkern.rank_all(_flat(h), _flat(r), _flat(E), targets, filter_index=filt, ties=ties,
                            layout="interleaved")
    # PyKEEN ranks larger-is-better on its own scores, which are embkern's negated: negate back.
    s = -_pk_scores(QuatEInteraction, h, quaternion.normalize(_flat(r)).reshape(r.shape), E)
    true = s.gather(1, targets[:, None])
    for b, f in enumerate(filt):
        s[b, f] = float("nan")  # PyKEEN's filtered evaluation masks known triples with NaN
    want = getattr(Ranks.from_scores(true, s), ties).double()
    torch.testing.assert_close(ours, want)


def test_pykeen_formula_without_pykeen():
    """PyKEEN's einsum formula, table built from the basis rules as in pykeen.nn.quaternion; no pykeen needed."""
    one, i, j, k = range(4)
    table = torch.zeros(4, 4, 4, dtype=torch.float64)
    rules = [(one, x, x, 1) for x in range(4)] + [(x, one, x, 1) for x in (i, j, k)]
    rules += [(x, x, one, -1) for x in (i, j, k)]
    rules += [(i, j, k, 1), (j, k, i, 1), (k, i, j, 1), (j, i, k, -1), (k, j, i, -1), (i, k, j, -1)]
    for a, b, c, v in rules:
        table[a, b, c] = v
    h, r, E = _tables(5, 8, 3, torch.float64, seed=4)
    r_hat = r / r.norm(dim=-1, keepdim=True)
    pk = -torch.einsum("bdi,bdj,ndk,ijk->bn", h, r_hat, E, table)
    ours = embkern.score_all(_flat(h), _flat(r), _flat(E), layout="interleaved")
    torch.testing.assert_close(ours, -pk, rtol=1e-10, atol=1e-10)
