"""The graded-letters task and Bradley-Terry labels: gold reward on hand-written responses, prompt format
and splits, corpus statistics, label noise against its temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import preferences
from envs.text_tasks import BOS, EOS, PAD, SEP, decode, encode


def _batch(task, pairs):
    prompts = jnp.asarray([encode(p) for p, _ in pairs], jnp.int32)
    responses = jnp.asarray([(encode(r) + [PAD] * task.max_response_len)[: task.max_response_len]
                             for _, r in pairs], jnp.int32)
    return prompts, responses


def test_gold_reward_on_hand_written_responses(maybe_jit):
    task = preferences.GradedLetters()
    prompts, responses = _batch(task, [
        ("^ac8|", "a1a2bdbd$"),      # 2 liked, 2 liked-digit bigrams, 4 neutral, length 8 = target
        ("^ac8|", "aaaaaaaa$"),      # 8 liked, repeated 6 times past the allowance of 2
        ("^ac8|", "cc.$"),           # 2 disliked, 1 filler, length 3 vs 8
        ("^ac8|", "a1a2bdbd"),       # no EOS: truncated at max_response_len (12 tokens, all PAD after)
        ("^ac8|", "a1a2bdbd$c.c.c"),  # tokens after EOS do not count
    ])
    gold = maybe_jit(task.gold_reward)(prompts, responses)
    expected = [
        0.6 * 2 + 0.4 * 2 + 0.2 * 4,
        0.6 * 8 - 0.5 * 36,
        -0.5 * 2 - 0.2 * 1 - 0.1 * 25,
        0.6 * 2 + 0.4 * 2 + 0.2 * 4 - 0.1 * (12 - 8) ** 2 - 1.0,
        0.6 * 2 + 0.4 * 2 + 0.2 * 4,
    ]
    np.testing.assert_allclose(gold, expected, rtol=1e-5, atol=1e-5)
    features = task.features(prompts, responses)
    np.testing.assert_allclose(features["length"], [8, 8, 3, 12, 8])
    np.testing.assert_allclose(features["repetition"], [0, 36, 0, 0, 0])
    score = task.score(prompts, responses)
    np.testing.assert_array_equal(score.correct, np.asarray(expected) >= task.good_threshold)
    np.testing.assert_array_equal(score.truncated, [False, False, False, True, False])


def test_prompts_are_well_formed_and_splits_disjoint():
    task = preferences.GradedLetters()
    sample = jax.jit(task.sample_prompts, static_argnums=(1, 2))
    train = np.asarray(sample(jax.random.PRNGKey(0), 400, "train"))
    test = np.asarray(sample(jax.random.PRNGKey(1), 200, "test"))
    for prompts in (train, test):
        assert prompts.shape[1] == task.prompt_len
        assert np.all(prompts[:, 0] == BOS) and np.all(prompts[:, -1] == SEP)
        liked, disliked, target = (np.asarray(x) for x in task.parse_prompts(jnp.asarray(prompts)))
        assert np.all((0 <= liked) & (liked < 4) & (0 <= disliked) & (disliked < 4) & (liked != disliked))
        assert np.all((task.length_min <= target) & (target <= task.length_max))
    assert not {decode(p) for p in train} & {decode(p) for p in test}


def test_corpus_has_a_broad_spread_of_gold_scores():
    task = preferences.GradedLetters()
    prompts, responses = jax.jit(task.base_corpus, static_argnums=1)(jax.random.PRNGKey(0), 4000)
    features = task.features(prompts, responses)
    lengths = np.asarray(features["length"])
    assert lengths.min() >= task.corpus_length_min and lengths.max() <= task.corpus_length_max
    assert not np.any(np.asarray(features["truncated"]))
    assert np.all(np.asarray(responses)[np.arange(4000), lengths.astype(int)] == EOS)
    body = np.asarray(features["length"]).sum()
    np.testing.assert_allclose(np.asarray(features["liked"]).sum() / body, task.corpus_liked, atol=0.02)
    np.testing.assert_allclose(np.asarray(features["filler"]).sum() / body, task.corpus_filler, atol=0.02)
    gold = np.asarray(task.gold_reward(prompts, responses))
    assert gold.std() > 1.0 and np.percentile(gold, 95) - np.percentile(gold, 5) > 4.0
    # repetition past the allowance is rare under the corpus: the reward model will see little of it
    assert np.mean(np.asarray(features["repetition"]) > 0) < 0.25


def test_bradley_terry_labels_follow_their_temperature():
    gold_a = jnp.asarray([1.0, 0.0, 2.0, 5.0])
    gold_b = jnp.asarray([0.0, 1.0, 2.0, -5.0])
    prompts = jnp.zeros((4, 5), jnp.int32)
    a = jnp.ones((4, 3), jnp.int32)
    b = 2 * a
    label = jax.jit(preferences.label_pairs, static_argnums=6)
    # near-noiseless: the gold order (a tie is a fair coin)
    pairs = label(jax.random.PRNGKey(0), prompts, a, b, gold_a, gold_b, 1e-3)
    np.testing.assert_array_equal(np.asarray(pairs.chosen)[:, 0][[0, 1, 3]], [1, 2, 1])
    np.testing.assert_allclose(np.asarray(pairs.gold_chosen)[[0, 1, 3]], [1.0, 1.0, 5.0])
    assert np.all(np.asarray(pairs.gold_chosen) >= np.asarray(pairs.gold_rejected))
    # the frequency of "a wins" is sigmoid((g_a - g_b) / T); the label probability is that of the label drawn
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    many = jax.vmap(lambda k: label(k, prompts, a, b, gold_a, gold_b, 2.0))(keys)
    a_wins = np.mean(np.asarray(many.chosen[:, :, 0]) == 1, axis=0)
    np.testing.assert_allclose(a_wins, 1 / (1 + np.exp(-(np.asarray(gold_a - gold_b)) / 2.0)), atol=0.03)
    drawn_prob = np.where(np.asarray(many.chosen[:, :, 0]) == 1, a_wins, 1 - a_wins)
    np.testing.assert_allclose(np.asarray(many.label_prob), drawn_prob, atol=0.03)
    # deterministic from the key
    again = label(jax.random.PRNGKey(0), prompts, a, b, gold_a, gold_b, 1e-3)
    np.testing.assert_array_equal(again.chosen, pairs.chosen)


def test_bad_knobs_and_temperatures_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        preferences.bradley_terry_prob(jnp.zeros(1), jnp.zeros(1), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        preferences.bradley_terry_prob(jnp.zeros(1), jnp.zeros(1), float("nan"))
    with pytest.raises(ValueError, match="length_min"):
        preferences.GradedLetters(length_min=7, length_max=3)
    with pytest.raises(ValueError, match="corpus token probabilities"):
        preferences.GradedLetters(corpus_liked=0.9, corpus_disliked=0.5)
