import numpy as np
import pytest
import torch

from core.data.pairs import pairs_from_records
from core.data.synthetic import one_d_pairs
from core.data.tasks import TaskConfig, TaskSampler


@pytest.fixture(scope="module")
def pairs():
    return one_d_pairs(2000, seed=3)


def test_context_is_subset_and_unseen_excludes_it(pairs):
    s = TaskSampler(pairs, TaskConfig(n_targets=12, max_context=8), "train", seed=1)
    b = s.sample(0, 64)
    for i in range(64):
        n_c = int(b.context_mask[i].sum())
        ctx = set(b.context_idx[i, :n_c].tolist())
        tgt = b.target_idx[i].tolist()
        assert ctx <= set(tgt)
        unseen = {t for t, u in zip(tgt, b.unseen_mask[i].tolist()) if u}
        assert not (unseen & ctx)
        assert len(unseen) == 12 - n_c
        # a context pair carries the same choice as the target it came from
        tchoice = dict(zip(tgt, b.target_choice[i].tolist()))
        for k in range(n_c):
            assert b.context_choice[i, k].item() == tchoice[b.context_idx[i, k].item()]
    assert len(set(b.context_mask.sum(1).tolist())) > 3  # N_C varies inside one batch
    assert b.context_mask.sum(1).max() <= 8


def test_disjoint_context_and_pools(pairs):
    test = pairs.indices("test")
    conflict = pairs.conflicting("up", "tent")
    tpool = test[conflict[test]]
    s = TaskSampler(pairs, TaskConfig(n_targets=5, max_context=4, context_mode="disjoint"), "test",
                    target_pool=tpool, context_pool=test)
    b = s.sample(3, 32, n_context=4)
    assert b.unseen_mask.all()
    for i in range(32):
        assert not set(b.context_idx[i].tolist()) & set(b.target_idx[i].tolist())
        assert set(b.target_idx[i].tolist()) <= set(tpool.tolist())
        assert set(b.context_idx[i].tolist()) <= set(test.tolist())


def test_choices_follow_the_user_type(pairs):
    s = TaskSampler(pairs, TaskConfig(n_targets=10, max_context=5), "train")
    b = s.sample(0, 40)
    for i in range(40):
        u = b.user_type[i].item()
        np.testing.assert_array_equal(b.target_choice[i].numpy(), pairs.choices[b.target_idx[i].numpy(), u])
    assert set(b.user_type.tolist()) == {0, 1}
    fixed = s.sample(1, 10, user_type="tent")
    assert (fixed.user_type == 1).all()


def test_seeded_and_reproducible(pairs):
    cfg = TaskConfig(n_targets=10, max_context=5)
    b1 = TaskSampler(pairs, cfg, "train", seed=5).sample(7, 16)
    b2 = TaskSampler(pairs, cfg, "train", seed=5).sample(7, 16)
    b3 = TaskSampler(pairs, cfg, "train", seed=5).sample(8, 16)
    b4 = TaskSampler(pairs, cfg, "train", seed=6).sample(7, 16)
    assert torch.equal(b1.target_idx, b2.target_idx) and torch.equal(b1.context_idx, b2.context_idx)
    assert not torch.equal(b1.target_idx, b3.target_idx)
    assert not torch.equal(b1.target_idx, b4.target_idx)


def test_targets_come_from_the_split(pairs):
    b = TaskSampler(pairs, TaskConfig(n_targets=10, max_context=3), "val").sample(0, 50)
    assert set(b.target_idx.flatten().tolist()) <= set(pairs.indices("val").tolist())


def test_fixed_context_size_and_zero(pairs):
    s = TaskSampler(pairs, TaskConfig(n_targets=10, max_context=5), "train")
    assert (s.sample(0, 8, n_context=3).n_context == 3).all()
    b0 = s.sample(0, 8, n_context=0)
    assert b0.context_idx.shape == (8, 0) and b0.unseen_mask.all()
    with pytest.raises(ValueError, match="out of range"):
        s.sample(0, 8, n_context=11)


def test_continuous_users_choose_by_their_weights():
    recs = []
    rng = np.random.default_rng(0)
    for i in range(200):
        va, vb = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
        recs.append({"id": f"c{i}", "a": [0.0], "b": [1.0], "choices": {},
                     "attributes": {"a": {"x": va[0], "y": va[1]}, "b": {"x": vb[0], "y": vb[1]}},
                     "split": "train"})
    ps = pairs_from_records(recs)
    for prior in ("dirichlet", "sphere"):
        s = TaskSampler(ps, TaskConfig(n_targets=20, max_context=5, users="continuous", weight_prior=prior), "train")
        b = s.sample(0, 16)
        assert (b.user_type == -1).all() and b.user_weights.shape == (16, 2)
        if prior == "dirichlet":
            assert torch.allclose(b.user_weights.sum(1), torch.ones(16)) and (b.user_weights >= 0).all()
        else:
            assert torch.allclose(b.user_weights.norm(dim=1), torch.ones(16), atol=1e-5)
        attrs = torch.from_numpy(ps.attributes)
        for i in range(16):
            delta = attrs[b.target_idx[i], 1] @ b.user_weights[i] - attrs[b.target_idx[i], 0] @ b.user_weights[i]
            assert torch.equal(b.target_choice[i], (delta > 0).float())


def test_bad_configs_are_named(pairs):
    with pytest.raises(ValueError, match="max_context <= n_targets"):
        TaskConfig(n_targets=5, max_context=6)
    with pytest.raises(ValueError, match="unknown task option"):
        TaskConfig.from_dict({"n_target": 3})
    with pytest.raises(ValueError, match="continuous users need per-option attributes"):
        TaskSampler(pairs, TaskConfig(users="continuous"), "train")
    with pytest.raises(KeyError, match="unknown user type"):
        TaskSampler(pairs, TaskConfig(user_types=["nobody"]), "train")


def test_teacher_context_extends_the_context_with_the_same_users_clicks(pairs):
    base = TaskConfig(n_targets=6, max_context=5, min_context=2, context_mode="disjoint")
    extra = TaskConfig(n_targets=6, max_context=5, min_context=2, context_mode="disjoint", teacher_context=7)
    plain = TaskSampler(pairs, base, "train", seed=2).sample(4, 32)
    assert plain.teacher_context_idx is None and plain.teacher_view() is plain
    b = TaskSampler(pairs, extra, "train", seed=2).sample(4, 32)
    assert b.teacher_context_idx.shape == (32, int(b.n_context.max()) + 7)
    t = b.teacher_view()
    assert t.teacher_context_idx is None and torch.equal(t.target_idx, b.target_idx)
    for i in range(32):
        n_c = int(b.n_context[i])
        assert int(t.context_mask[i].sum()) == n_c + 7
        ctx, tctx = b.context_idx[i, :n_c].tolist(), t.context_idx[i, :n_c + 7].tolist()
        assert tctx[:n_c] == ctx and len(set(tctx)) == n_c + 7  # the task's context first, then 7 new pairs
        assert not set(tctx) & set(b.target_idx[i].tolist())
        assert t.context_choice[i, :n_c].tolist() == b.context_choice[i, :n_c].tolist()
        u = b.user_type[i].item()  # every extra click is the same user's
        np.testing.assert_array_equal(t.context_choice[i, :n_c + 7].numpy(), pairs.choices[tctx, u])
    with pytest.raises(ValueError, match="teacher_context"):
        TaskConfig(n_targets=6, max_context=5, teacher_context=3)  # subset mode
    with pytest.raises(ValueError, match="teacher_context"):
        TaskConfig(n_targets=6, max_context=5, context_mode="disjoint", teacher_context=-1)
