"""Attention summaries: each score is exactly 1 on the pattern it names and 0 on the others; on a model they
are the documented means of the forward's pattern; the induction score reads the second copy of a repeated
block; pattern images are written."""

from __future__ import annotations

import numpy as np
import pytest

from probes import attention
from test_lens import BATCH, CFG, random_params, random_tokens


def one_hot_pattern(seq, key_of_query):
    """A [seq, key] pattern where query q attends only to key_of_query(q)."""
    pattern = np.zeros((seq, seq))
    for q in range(seq):
        pattern[q, key_of_query(q)] = 1.0
    return pattern


def test_scores_are_one_on_their_own_pattern_and_zero_on_the_others():
    seq = 8
    first = one_hot_pattern(seq, lambda q: 0)
    previous = one_hot_pattern(seq, lambda q: max(q - 1, 0))
    itself = one_hot_pattern(seq, lambda q: q)
    assert attention.first_token_score(first) == 1.0
    assert attention.previous_token_score(previous) == 1.0
    assert attention.self_score(itself) == 1.0
    assert attention.first_token_score(itself) == 0.0 and attention.self_score(first) == 0.0
    assert attention.previous_token_score(itself) == 0.0 and attention.self_score(previous) == 0.0
    assert attention.previous_token_score(first) == pytest.approx(1 / (seq - 1))  # query 1's previous is key 0
    n = 4
    induction = one_hot_pattern(2 * n, lambda q: q - n + 1 if q >= n else 0)
    assert attention.induction_score(induction, n) == 1.0
    assert attention.induction_score(previous, n) == 0.0
    uniform = np.tril(np.ones((2 * n, 2 * n))) / np.arange(1, 2 * n + 1)[:, None]
    np.testing.assert_allclose(attention.induction_score(uniform, n), np.mean(1 / np.arange(n + 1, 2 * n + 1)))


def test_repeated_random_tokens_repeat_a_block():
    tokens = attention.repeated_random_tokens(CFG, 5, 3, seed=1)
    assert tokens.shape == (3, 10) and tokens.max() < CFG.vocab_size
    np.testing.assert_array_equal(tokens[:, :5], tokens[:, 5:])


N = CFG.n_ctx // 2  # repeated blocks of N tokens fill the context


def test_head_summary_is_the_documented_means_of_the_forward_pattern():
    params = random_params(8)
    repeated = attention.repeated_random_tokens(CFG, N, 4, seed=3)  # what the induction score runs on
    tokens = repeated[:, ::-1].copy()  # a prompt of the same shape (one compiled forward serves both)
    summary = attention.head_summary(params, CFG, tokens, induction_n=N, seed=3)
    pattern = np.asarray(attention.attention_patterns(params, CFG, tokens), np.float64)
    queries = np.arange(1, 2 * N)
    np.testing.assert_allclose(summary.first, pattern[..., 1:, 0].mean(-1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(summary.previous, pattern[..., queries, queries - 1].mean(-1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(summary.diagonal, pattern[..., queries, queries].mean(-1).mean(1), rtol=1e-5)

    pattern = np.asarray(attention.attention_patterns(params, CFG, repeated), np.float64)
    second = np.arange(N, 2 * N)
    np.testing.assert_allclose(summary.induction, pattern[..., second, second - N + 1].mean(-1).mean(1), rtol=1e-5)

    rows = summary.rows()
    assert len(rows) == CFG.n_layer * CFG.n_head
    assert {"layer", "head", "first", "previous", "diagonal", "induction"} == set(rows[0])
    assert all(0.0 <= r[name] <= 1.0 for r in rows for name in ("first", "previous", "diagonal", "induction"))


def test_pattern_image_is_written(tmp_path):
    params = random_params(9)
    tokens = attention.repeated_random_tokens(CFG, N, 4, seed=4)
    pattern = np.asarray(attention.attention_patterns(params, CFG, tokens))[:, 0]  # [layer, head, seq, key]
    path = tmp_path / "patterns.png"
    plots = pytest.importorskip("probes.plots")
    fig = plots.attention_patterns(pattern, [f"t{i}" for i in range(2 * N)], layers=[0, 2], prompt="test")
    plots.save(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * CFG.n_head + 1  # a panel per (layer, head) and one colour bar


def test_bad_inputs_are_clear_errors():
    params = random_params(0)
    with pytest.raises(ValueError, match="at least 2 positions"):
        attention.head_summary(params, CFG, random_tokens(0, BATCH, 1))
    with pytest.raises(ValueError, match=r"2 <= n <= n_ctx / 2 = 8"):
        attention.induction_scores(params, CFG, n=9)
