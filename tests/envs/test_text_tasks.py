"""Toy language tasks: rewards on hand-written answers, sampler ranges, corpus corruption rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.text_tasks import (
    BOS,
    CHARS,
    EOS,
    PAD,
    SEP,
    TASKS,
    VOCAB_SIZE,
    decode,
    encode,
    make_task,
)


def _batch(task, pairs):
    """Token arrays for hand-written (prompt, response) strings, padded like the samplers pad them."""
    prompts, responses = [], []
    for prompt, response in pairs:
        p = encode(prompt)
        r = encode(response)
        prompts.append([PAD] * (task.prompt_len - len(p)) + p)
        responses.append((r + [PAD] * task.max_response_len)[: task.max_response_len])
    return jnp.asarray(prompts, jnp.int32), jnp.asarray(responses, jnp.int32)


def _score(task, pairs):
    return task.score(*_batch(task, pairs))


def _corpus(task, key, num):
    return jax.jit(task.base_corpus, static_argnums=1)(key, num)


def _prompts(task, key, num, split):
    return np.asarray(jax.jit(task.sample_prompts, static_argnums=(1, 2))(key, num, split))


def test_vocabulary_round_trip():
    assert VOCAB_SIZE == len(CHARS) <= 32
    assert (PAD, BOS, SEP, EOS) == tuple(encode("_^|$"))
    assert decode(encode("^123|321$")) == "^123|321$"
    assert decode(encode("__^1|")) == "^1|"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("x")


def test_reverse_rewards(maybe_jit):
    task = make_task("reverse", n_min=3, n_max=8)
    score = maybe_jit(task.score)(*_batch(task, [
        ("^123|", "321$"),         # correct
        ("^123|", "321"),          # no EOS: truncated, wrong
        ("^123|", "3214$"),        # extra digit
        ("^12345678|", "87654321$"),
        ("^123|", "311$"),
        ("^123|", "321$$"),        # tokens after the first EOS do not matter
    ]))
    np.testing.assert_array_equal(score.reward, [1, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(score.truncated, [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(score.length, [4, 10, 5, 9, 4, 4])
    dense = make_task("reverse", dense=True)
    pairs = [("^123|", "321$"), ("^123|", "311$"), ("^123|", "329$"), ("^123|", "9")]
    score = dense.score(*_batch(dense, pairs))
    np.testing.assert_allclose(score.reward, [1.0, 0.25, 0.5, 0.0])
    np.testing.assert_array_equal(score.correct, [1, 0, 0, 0])


def test_scratchpad_sum_rewards():
    task = make_task("scratchpad_sum", k_min=3, k_max=6, max_response_len=24)
    score = _score(task, [
        ("^357|", "=5$"),             # 15 mod 10, no scratchpad
        ("^357|", "3.8..5=5$"),       # with a scratchpad
        ("^357|", "=4$"),             # wrong digit
        ("^357|", "=5"),              # no EOS
        ("^357|", "=55$"),            # EOS not right after the answer
        ("^357|", "1=2=5$"),          # the first "=" counts
        ("^357|", "." * 24),          # overlong
        ("^999999|", "=4$"),
    ])
    np.testing.assert_array_equal(score.reward, [1, 1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(score.truncated, [0, 0, 0, 1, 0, 0, 1, 0])
    with pytest.raises(ValueError, match="24, 32"):
        make_task("scratchpad_sum", max_response_len=40)


def test_constrained_string_rewards():
    task = make_task("constrained_string", n_min=3, n_max=8)
    score = _score(task, [
        ("^52|", "badab$"),
        ("^52|", "abcba$"),
        ("^52|", "abcab$"),     # not a palindrome
        ("^52|", "bacab$"),     # one "a" short... b a c a b has 2 a's: valid
        ("^52|", "aaaaa$"),     # too many a's
        ("^52|", "bdadb"),      # no EOS
        ("^40|", "bccb$"),
        ("^40|", "bccbb$"),     # wrong length
        ("^31|", "bab$"),
        ("^31|", "b=b$"),       # not a letter
    ])
    np.testing.assert_array_equal(score.reward, [1, 1, 0, 1, 0, 0, 1, 0, 1, 0])


def test_countdown_rewards():
    task = make_task("countdown_lite", n_min=3, n_max=4)
    score = _score(task, [
        ("^374=+0025|", "3*7+4$"),       # left to right: 21 + 4
        ("^374=+0025|", "4+3*7$"),       # (4 + 3) * 7 = 49: parseable, wrong
        ("^374=+0025|", "3*7+5$"),       # 25 but uses 5 instead of 4
        ("^374=+0025|", "3*7+$"),        # not parseable
        ("^374=+0025|", "3*7+4"),        # no EOS
        ("^374=+0025|", "37+4$"),        # two digits in a row
        ("^1234=-0008|", "1-2-3-4$"),    # 1 - 2 - 3 - 4 = -8
        ("^1234=+0024|", "4*3*2*1$"),
        ("^1234=+0024|", "4*3*2$"),      # a digit unused
    ])
    np.testing.assert_allclose(score.reward, [1, 0.1, 0.1, 0, 0, 0, 1, 1, 0.1])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_samplers_layout_and_ranges(name):
    task = make_task(name)
    prompts = _prompts(task, jax.random.PRNGKey(0), 512, "train")
    assert prompts.shape == (512, task.prompt_len) and prompts.dtype == np.int32
    assert np.all(prompts[:, -1] == SEP)
    assert np.all(np.sum(prompts == BOS, axis=1) == 1)
    first = np.argmax(prompts != PAD, axis=1)
    assert np.all(prompts[np.arange(512), first] == BOS)  # left padding, then BOS
    sizes = np.sum((prompts >= CHARS.index("0")) & (prompts <= CHARS.index("9")), axis=1)
    if name == "reverse":
        assert sizes.min() == task.n_min and sizes.max() == task.n_max
    if name == "scratchpad_sum":
        assert sizes.min() == task.k_min and sizes.max() == task.k_max
    if name == "constrained_string":
        n, c = prompts[:, 1] - CHARS.index("0"), prompts[:, 2] - CHARS.index("0")
        assert n.min() == task.n_min and n.max() == task.n_max
        assert np.all((c <= n) & ((n % 2 == 1) | (c % 2 == 0)))
    if name == "countdown_lite":
        digits = np.sum((prompts[:, : task.prompt_len - 7] >= CHARS.index("1"))
                        & (prompts[:, : task.prompt_len - 7] <= CHARS.index("9")), axis=1)
        assert digits.min() == task.n_min and digits.max() == task.n_max


@pytest.mark.parametrize("name", ["reverse", "scratchpad_sum", "countdown_lite"])
def test_train_and_test_prompts_are_disjoint(name):
    task = make_task(name)
    train = {tuple(r) for r in _prompts(task, jax.random.PRNGKey(1), 1000, "train").tolist()}
    test = {tuple(r) for r in _prompts(task, jax.random.PRNGKey(2), 1000, "test").tolist()}
    assert len(test) > 300 and not train & test
    with pytest.raises(ValueError, match="split"):
        task.sample_prompts(jax.random.PRNGKey(0), 4, "valid")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_clean_corpus_is_correct(name):
    """With every corruption knob at 0 the corpus answers are all correct (so the reward agrees with the
    generator), and reachable countdown targets are checked by the same scorer."""
    knobs = {"reverse": {"corpus_token_noise": 0.0},
             "scratchpad_sum": {"corpus_step_noise": 0.0, "corpus_filler_max": 1},
             "constrained_string": {"corpus_token_noise": 0.0},
             "countdown_lite": {"corpus_op_noise": 0.0, "corpus_digit_noise": 0.0}}[name]
    task = make_task(name, **knobs)
    prompts, responses = _corpus(task, jax.random.PRNGKey(3), 500)
    assert responses.shape == (500, task.max_response_len)
    score = task.score(prompts, responses)
    assert bool(jnp.all(score.correct))


def test_corpus_corruption_rates():
    """Measured corruption matches the knobs: a reverse answer digit is wrong with probability 0.9 q; a
    scratchpad sum is right when no step is corrupted (or a corrupted step lands right by chance)."""
    q = 0.2
    task = make_task("reverse", corpus_token_noise=q)
    prompts, responses = _corpus(task, jax.random.PRNGKey(4), 4000)
    answer = task._answer(prompts)
    is_digit = (answer >= CHARS.index("0")) & (answer <= CHARS.index("9"))
    wrong = np.asarray(jnp.sum((responses != answer) & is_digit) / jnp.sum(is_digit))
    assert abs(wrong - 0.9 * q) < 0.015
    n = np.asarray(jnp.sum(is_digit, axis=1))
    expected = np.mean((1 - 0.9 * q) ** n)
    assert abs(float(task.score(prompts, responses).correct.mean()) - expected) < 0.03

    sums = make_task("scratchpad_sum", k_min=4, k_max=4, corpus_step_noise=0.1, corpus_filler_max=0)
    score = sums.score(*_corpus(sums, jax.random.PRNGKey(5), 4000))
    # the answer is right if the last corrupted step (if any) happens to land on the right running sum
    expected = 0.9**4 + (1 - 0.9**4) * 0.1
    assert abs(float(score.correct.mean()) - expected) < 0.03
    np.testing.assert_array_equal(score.length, 4 + 3)

    longer = make_task("scratchpad_sum", k_min=6, k_max=6, corpus_filler_max=4, max_response_len=24)
    score = longer.score(*_corpus(longer, jax.random.PRNGKey(6), 2000))
    assert 0.05 < float(score.truncated.mean()) < 0.6  # the length knob reaches past max_response_len

    strings = make_task("constrained_string", corpus_token_noise=0.0, corpus_letter_weights=(1.0, 0.0, 0.0))
    _, responses = _corpus(strings, jax.random.PRNGKey(7), 1000)
    letters = np.asarray(responses)[np.asarray(responses) >= CHARS.index("a")]
    assert set(np.unique(letters).tolist()) <= {CHARS.index("a"), CHARS.index("b")}


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sort")
    with pytest.raises(ValueError, match="reverse n"):
        make_task("reverse", n_min=5, n_max=3)
    with pytest.raises(ValueError, match="corpus_token_noise"):
        make_task("constrained_string", corpus_token_noise=1.5)
