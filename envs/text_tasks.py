"""Toy language tasks with verifiable rewards (003 section 5.1: tokens as actions, a sequence-level reward).

A character-level vocabulary of 23 tokens (``CHARS``; one character per token, the special tokens written
``_`` PAD, ``^`` BOS, ``|`` SEP, ``$`` EOS). Every task is a frozen dataclass with

- ``prompt_len`` / ``max_response_len``: the static widths of the token arrays;
- ``sample_prompts(key, num, split)`` -> prompts ``[num, prompt_len]`` int32, left-padded with PAD, always
  ``... BOS body SEP`` so that a response starts at the same column for every prompt;
- ``score(prompts, responses)`` -> ``TaskScore`` of ``[num]`` arrays; a response ``[num, max_response_len]``
  is the generated tokens, the answer ends with EOS and is followed by PAD; no EOS means truncated;
- ``base_corpus(key, num)`` -> ``(prompts, responses)``: a deliberately imperfect supervised corpus whose
  corruption knobs set the warm-started model's accuracy, length and entropy (the "SFT" stage of the
  RLHF pipeline, 004 and 002).

All three are pure jittable functions of arrays (the dataclass fields are static). ``split`` is ``"train"``,
``"test"`` or ``"all"``: a fixed hash of the prompt tokens puts about one prompt in five in the test split,
so that evaluation uses held-out prompts (``constrained_string`` has too few distinct prompts for that;
it ignores ``split`` and tests generalisation over answers instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

CHARS = "_^|$0123456789abcd=+-*."
VOCAB_SIZE = len(CHARS)
PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = CHARS.index("0")
LETTER_A = CHARS.index("a")
EQUALS = CHARS.index("=")
PLUS, MINUS, TIMES = CHARS.index("+"), CHARS.index("-"), CHARS.index("*")
FILLER = CHARS.index(".")
SPLITS = ("train", "test", "all")
_SPLIT_CANDIDATES = 64  # candidates drawn per prompt to find one in the requested split


def encode(text: str) -> list[int]:
    """Token ids of a string written in ``CHARS`` (``^12|`` is BOS 1 2 SEP)."""
    unknown = sorted(set(text) - set(CHARS))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the vocabulary {CHARS!r}")
    return [CHARS.index(c) for c in text]


def decode(tokens, strip_padding: bool = True) -> str:
    """String of a 1-D sequence of token ids; with ``strip_padding`` PAD tokens are dropped."""
    return "".join(CHARS[int(t)] for t in tokens if not (strip_padding and int(t) == PAD))


class TaskScore(NamedTuple):
    """Per-response results, each ``[num]``: the reward, whether the answer is correct (pass@k counts these),
    whether the response was truncated (no EOS within ``max_response_len``) and its length in tokens
    (up to and including EOS; ``max_response_len`` when truncated)."""

    reward: jax.Array
    correct: jax.Array
    truncated: jax.Array
    length: jax.Array


def response_lengths(responses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(lengths, truncated)`` of responses ``[N, L]``: tokens up to and including the first EOS, or L."""
    is_eos = responses == EOS
    truncated = ~jnp.any(is_eos, axis=-1)
    first_eos = jnp.argmax(is_eos, axis=-1)
    lengths = jnp.where(truncated, responses.shape[-1], first_eos + 1)
    return lengths.astype(jnp.int32), truncated


def left_pad(body: jax.Array, body_len: jax.Array, width: int) -> jax.Array:
    """Right-align the first ``body_len[i]`` tokens of each row of ``body [N, W]`` in a PAD row of
    ``width``."""
    columns = jnp.arange(width)[None, :]
    source = columns - (width - body_len[:, None])
    taken = jnp.take_along_axis(body, jnp.clip(source, 0, body.shape[1] - 1), axis=1)
    return jnp.where(source >= 0, taken, PAD).astype(jnp.int32)


def _prompt_hash_is_test(prompts: jax.Array) -> jax.Array:
    """A fixed hash of each prompt row ``[N, P]``: True for about one prompt in five (the test split)."""
    weights = (jnp.arange(prompts.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761)) ^ jnp.uint32(40503)
    h = jnp.sum(prompts.astype(jnp.uint32) * weights, axis=1, dtype=jnp.uint32)
    h = (h ^ (h >> 13)) * jnp.uint32(1274126177)
    return (h >> 16) % 5 == 0


def _select_split(key, num: int, split: str, generate, use_split: bool = True):
    """Draw candidates with ``generate(key, n) -> (prompts, *extras)`` and keep, per output row, the first
    candidate whose prompt lies in ``split`` (``_SPLIT_CANDIDATES`` tries; the chance of none is
    below 1e-6)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all" or not use_split:
        return generate(key, num)
    tries = _SPLIT_CANDIDATES
    outputs = generate(key, num * tries)
    in_test = _prompt_hash_is_test(outputs[0]).reshape(num, tries)
    wanted = in_test if split == "test" else ~in_test
    pick = jnp.arange(num) * tries + jnp.argmax(wanted, axis=1)
    return tuple(x[pick] for x in outputs)


def _check_range(name: str, low: int, high: int, lo_bound: int, hi_bound: int) -> None:
    if not lo_bound <= low <= high <= hi_bound:
        raise ValueError(f"{name}: need {lo_bound} <= min <= max <= {hi_bound}, got [{low}, {high}]")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class Reverse:
    """Reverse a string of n digits, n uniform in [n_min, n_max]: prompt ``^123|``, answer ``321$``.

    Reward 1 for the exact answer (EOS right after the reversal), else 0; with ``dense`` the fraction of the
    n + 1 answer tokens (EOS included) matched before the first mistake. All answers for one n have the same
    length, and a mix of n gives groups that are all correct (short n) and all wrong (long n).
    Corpus knob: ``corpus_token_noise``, the probability that each answer digit is replaced by a uniformly
    random digit.
    """

    n_min: int = 3
    n_max: int = 8
    dense: bool = False
    corpus_token_noise: float = 0.15
    name: str = "reverse"

    def __post_init__(self):
        _check_range("reverse n", self.n_min, self.n_max, 1, 12)
        _check_prob("corpus_token_noise", self.corpus_token_noise)

    @property
    def prompt_len(self) -> int:
        return self.n_max + 2

    @property
    def max_response_len(self) -> int:
        return self.n_max + 2

    def _generate(self, key, num):
        k_n, k_d, k_noise, k_rand = jax.random.split(key, 4)
        n = jax.random.randint(k_n, (num,), self.n_min, self.n_max + 1)
        digits = jax.random.randint(k_d, (num, self.n_max), 0, 10)
        body = jnp.concatenate(
            [jnp.full((num, 1), BOS), DIGIT0 + digits, jnp.full((num, 1), SEP)], axis=1)
        body = jnp.where(jnp.arange(self.n_max + 2)[None] == n[:, None] + 1, SEP, body)
        prompts = left_pad(body, n + 2, self.prompt_len)
        answer = self._answer(prompts)
        noisy = jax.random.bernoulli(k_noise, self.corpus_token_noise, answer.shape)
        is_digit = (answer >= DIGIT0) & (answer < DIGIT0 + 10)
        random_digits = DIGIT0 + jax.random.randint(k_rand, answer.shape, 0, 10)
        return prompts, jnp.where(noisy & is_digit, random_digits, answer).astype(jnp.int32)

    def _answer(self, prompts):
        """The correct response ``[N, L]``: reversed digits, EOS, PAD."""
        n = jnp.sum((prompts >= DIGIT0) & (prompts < DIGIT0 + 10), axis=1)
        j = jnp.arange(self.max_response_len)[None]
        source = jnp.clip(self.prompt_len - 2 - j, 0, self.prompt_len - 1)
        source = jnp.broadcast_to(source, (prompts.shape[0], j.shape[1]))
        reversed_digits = jnp.take_along_axis(prompts, source, 1)
        answer = jnp.where(j < n[:, None], reversed_digits, jnp.where(j == n[:, None], EOS, PAD))
        return answer.astype(jnp.int32)

    def sample_prompts(self, key, num: int, split: str = "train") -> jax.Array:
        return _select_split(key, num, split, self._generate)[0]

    def base_corpus(self, key, num: int) -> tuple[jax.Array, jax.Array]:
        return _select_split(key, num, "train", self._generate)

    def score(self, prompts, responses) -> TaskScore:
        answer = self._answer(prompts)
        n = jnp.sum((prompts >= DIGIT0) & (prompts < DIGIT0 + 10), axis=1)
        lengths, truncated = response_lengths(responses)
        in_answer = jnp.arange(self.max_response_len)[None] <= n[:, None]
        match = (responses == answer) | ~in_answer
        correct = jnp.all(match, axis=1)
        prefix = jnp.sum(jnp.cumprod(match & in_answer, axis=1), axis=1) / (n + 1)
        reward = prefix if self.dense else correct.astype(jnp.float32)
        return TaskScore(reward.astype(jnp.float32), correct, truncated, lengths)


@dataclass(frozen=True)
class ScratchpadSum:
    """Sum of k digits mod 10, k in [k_min, k_max], after a free-length scratchpad: prompt ``^357|``, a
    response such as ``3.8..5=5$`` (anything before the first ``=`` is the scratchpad), reward 1 when the
    digit right after the first ``=`` is the sum mod 10 and EOS follows it, else 0; a response with no EOS
    within ``max_response_len`` (24 to 32) is truncated and scores 0 (overlong handling is the trainer's).

    Corpus: the scratchpad holds the running sums mod 10, each followed by 0 to ``corpus_filler_max``
    filler dots (the length knob; long fillers on large k run past ``max_response_len``), each running sum
    is wrong with probability ``corpus_step_noise`` and the corpus answer is the last running sum, so a
    wrong step makes a wrong answer.
    """

    k_min: int = 3
    k_max: int = 6
    max_response_len: int = 24
    corpus_step_noise: float = 0.1
    corpus_filler_max: int = 2
    name: str = "scratchpad_sum"

    def __post_init__(self):
        _check_range("scratchpad_sum k", self.k_min, self.k_max, 1, 10)
        if not 24 <= self.max_response_len <= 32:
            raise ValueError(
                f"scratchpad_sum max_response_len must lie in [24, 32], got {self.max_response_len}")
        if self.corpus_filler_max < 0:
            raise ValueError(f"corpus_filler_max must be >= 0, got {self.corpus_filler_max}")
        _check_prob("corpus_step_noise", self.corpus_step_noise)

    @property
    def prompt_len(self) -> int:
        return self.k_max + 2

    def _generate(self, key, num):
        k_k, k_d, k_noise, k_rand, k_fill = jax.random.split(key, 5)
        k = jax.random.randint(k_k, (num,), self.k_min, self.k_max + 1)
        digits = jax.random.randint(k_d, (num, self.k_max), 0, 10)
        valid = jnp.arange(self.k_max)[None] < k[:, None]
        body = jnp.concatenate([jnp.full((num, 1), BOS), DIGIT0 + digits, jnp.full((num, 1), SEP)], axis=1)
        body = jnp.where(jnp.arange(self.k_max + 2)[None] == k[:, None] + 1, SEP, body)
        prompts = left_pad(body, k + 2, self.prompt_len)

        noisy = jax.random.bernoulli(k_noise, self.corpus_step_noise, (num, self.k_max))
        random_digits = jax.random.randint(k_rand, (num, self.k_max), 0, 10)

        def running_sum(carry, inputs):
            digit, is_noisy, random_digit = inputs
            value = jnp.where(is_noisy, random_digit, (carry + digit) % 10)
            return value, value

        inputs = (digits.T, noisy.T, random_digits.T)
        _, sums = jax.lax.scan(running_sum, jnp.zeros((num,), jnp.int32), inputs)
        sums = sums.T  # [num, k_max]
        fillers = jax.random.randint(k_fill, (num, self.k_max), 0, self.corpus_filler_max + 1) * valid
        step_len = (1 + fillers) * valid
        offsets = jnp.cumsum(step_len, axis=1) - step_len  # where each running sum is written
        end = jnp.sum(step_len, axis=1)  # position of "="
        answer = jnp.take_along_axis(sums, (k - 1)[:, None], axis=1)[:, 0]
        width = self.k_max * (2 + self.corpus_filler_max) + 3
        rows = jnp.arange(num)[:, None]
        buffer = jnp.full((num, width), FILLER, jnp.int32)
        buffer = buffer.at[rows, jnp.where(valid, offsets, width)].set(DIGIT0 + sums, mode="drop")
        column = jnp.arange(width)[None]
        buffer = jnp.where(column == end[:, None], EQUALS, buffer)
        buffer = jnp.where(column == end[:, None] + 1, DIGIT0 + answer[:, None], buffer)
        buffer = jnp.where(column == end[:, None] + 2, EOS, buffer)
        buffer = jnp.where(column > end[:, None] + 2, PAD, buffer)
        if width < self.max_response_len:
            buffer = jnp.pad(buffer, ((0, 0), (0, self.max_response_len - width)), constant_values=PAD)
        return prompts, buffer[:, : self.max_response_len]

    def sample_prompts(self, key, num: int, split: str = "train") -> jax.Array:
        return _select_split(key, num, split, self._generate)[0]

    def base_corpus(self, key, num: int) -> tuple[jax.Array, jax.Array]:
        return _select_split(key, num, "train", self._generate)

    def score(self, prompts, responses) -> TaskScore:
        is_digit = (prompts >= DIGIT0) & (prompts < DIGIT0 + 10)
        target = jnp.sum(jnp.where(is_digit, prompts - DIGIT0, 0), axis=1) % 10
        lengths, truncated = response_lengths(responses)
        is_equals = responses == EQUALS
        has_equals = jnp.any(is_equals, axis=1)
        position = jnp.argmax(is_equals, axis=1)
        padded = jnp.pad(responses, ((0, 0), (0, 2)), constant_values=PAD)
        after = jnp.take_along_axis(padded, (position + 1)[:, None], axis=1)[:, 0]
        after2 = jnp.take_along_axis(padded, (position + 2)[:, None], axis=1)[:, 0]
        correct = has_equals & (after == DIGIT0 + target) & (after2 == EOS) & (lengths == position + 3)
        correct = correct & ~truncated
        return TaskScore(correct.astype(jnp.float32), correct, truncated, lengths)


@dataclass(frozen=True)
class ConstrainedString:
    """A palindrome of length n over {a, b, c, d} with exactly c letters ``a``: prompt ``^52|`` (n = 5,
    c = 2), answers such as ``badab$`` or ``abcba$``. n uniform in [n_min, n_max] (at most 9), c uniform
    over the feasible counts (even when n is even). Many answers are correct: the task where entropy
    collapse, clip-higher and pass@k show. Reward 1 for a valid answer followed by EOS, else 0.

    Corpus: valid palindromes whose non-``a`` letters are drawn with weights ``corpus_letter_weights`` for
    (b, c, d) (the entropy knob), then each letter replaced by a random letter with probability
    ``corpus_token_noise`` (the accuracy knob). The prompt space is small, so ``split`` is ignored.
    """

    n_min: int = 3
    n_max: int = 8
    corpus_token_noise: float = 0.05
    corpus_letter_weights: tuple[float, float, float] = (4.0, 2.0, 1.0)
    name: str = "constrained_string"

    def __post_init__(self):
        _check_range("constrained_string n", self.n_min, self.n_max, 1, 9)
        _check_prob("corpus_token_noise", self.corpus_token_noise)
        weights = self.corpus_letter_weights
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"corpus_letter_weights must be 3 non-negative weights, got {weights}")

    @property
    def prompt_len(self) -> int:
        return 4

    @property
    def max_response_len(self) -> int:
        return self.n_max + 2

    def _generate(self, key, num):
        k_n, k_c, k_pos, k_letters, k_noise, k_rand = jax.random.split(key, 6)
        n = jax.random.randint(k_n, (num,), self.n_min, self.n_max + 1)
        odd = n % 2
        # feasible counts: all of 0..n when n is odd, the even ones when n is even
        num_counts = jnp.where(odd == 1, n + 1, n // 2 + 1)
        pick = jax.random.randint(k_c, (num,), 0, 2**20) % num_counts
        c = jnp.where(odd == 1, pick, 2 * pick)
        prompts = jnp.stack([jnp.full((num,), BOS), DIGIT0 + n, DIGIT0 + c, jnp.full((num,), SEP)], 1)

        half = self.n_max // 2
        j = jnp.arange(half)[None]
        in_half = j < (n // 2)[:, None]
        scores = jnp.where(in_half, jax.random.uniform(k_pos, (num, half)), 2.0)
        rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
        is_a = rank < (c // 2)[:, None]
        logits = jnp.log(jnp.asarray(self.corpus_letter_weights, jnp.float32) + 1e-30)
        other = LETTER_A + 1 + jax.random.categorical(k_letters, logits, shape=(num, half + 1))
        half_letters = jnp.where(is_a, LETTER_A, other[:, :half])
        middle = jnp.where(c % 2 == 1, LETTER_A, other[:, half])

        # position i < n: mirror index min(i, n - 1 - i) into the half, the middle when n is odd
        i = jnp.arange(self.max_response_len)[None]
        mirror = jnp.minimum(i, n[:, None] - 1 - i)
        if half:
            letters = jnp.take_along_axis(half_letters, jnp.clip(mirror, 0, half - 1), axis=1)
        else:
            letters = jnp.full((num, self.max_response_len), LETTER_A, jnp.int32)
        is_middle = (odd[:, None] == 1) & (i == n[:, None] // 2)
        letters = jnp.where(is_middle, middle[:, None], letters)
        noisy = jax.random.bernoulli(k_noise, self.corpus_token_noise, letters.shape)
        letters = jnp.where(noisy, LETTER_A + jax.random.randint(k_rand, letters.shape, 0, 4), letters)
        responses = jnp.where(i < n[:, None], letters, jnp.where(i == n[:, None], EOS, PAD))
        return prompts.astype(jnp.int32), responses.astype(jnp.int32)

    def sample_prompts(self, key, num: int, split: str = "train") -> jax.Array:
        return _select_split(key, num, split, self._generate, use_split=False)[0]

    def base_corpus(self, key, num: int) -> tuple[jax.Array, jax.Array]:
        return _select_split(key, num, "train", self._generate, use_split=False)

    def score(self, prompts, responses) -> TaskScore:
        n = prompts[:, 1] - DIGIT0
        c = prompts[:, 2] - DIGIT0
        lengths, truncated = response_lengths(responses)
        i = jnp.arange(self.max_response_len)[None]
        inside = i < n[:, None]
        is_letter = (responses >= LETTER_A) & (responses < LETTER_A + 4)
        mirror = jnp.clip(n[:, None] - 1 - i, 0, self.max_response_len - 1)
        symmetric = responses == jnp.take_along_axis(responses, mirror, axis=1)
        count_a = jnp.sum(inside & (responses == LETTER_A), axis=1)
        correct = (~truncated) & (lengths == n + 1) & jnp.all(~inside | (is_letter & symmetric), axis=1)
        correct = correct & (count_a == c)
        return TaskScore(correct.astype(jnp.float32), correct, truncated, lengths)


@dataclass(frozen=True)
class CountdownLite:
    """Reach a target with n digits (1 to 9, n in [n_min, n_max], 3 or 4) and the operators + - *, each digit
    used once, evaluated left to right (no precedence): prompt ``^374=+0025|`` (digits, ``=``, signed
    4-digit target), an answer such as ``3*7+4$``. The target is the value of a random ordering of the
    digits with random operators, so it is reachable. Reward 1 correct, 0.1 for a parseable expression
    (digits and operators alternating, then EOS) that is wrong, 0 otherwise.

    Corpus: the generating expression, each operator replaced by a random one with probability
    ``corpus_op_noise`` and each digit by a random digit with probability ``corpus_digit_noise``.
    """

    n_min: int = 3
    n_max: int = 4
    corpus_op_noise: float = 0.2
    corpus_digit_noise: float = 0.05
    name: str = "countdown_lite"

    def __post_init__(self):
        _check_range("countdown_lite n", self.n_min, self.n_max, 2, 4)
        _check_prob("corpus_op_noise", self.corpus_op_noise)
        _check_prob("corpus_digit_noise", self.corpus_digit_noise)

    @property
    def prompt_len(self) -> int:
        return self.n_max + 8

    @property
    def max_response_len(self) -> int:
        return 2 * self.n_max + 1

    def _generate(self, key, num):
        k_n, k_d, k_perm, k_ops, k_opn, k_opr, k_dn, k_dr = jax.random.split(key, 8)
        n = jax.random.randint(k_n, (num,), self.n_min, self.n_max + 1)
        digits = jax.random.randint(k_d, (num, self.n_max), 1, 10)
        valid = jnp.arange(self.n_max)[None] < n[:, None]
        order = jnp.argsort(jnp.where(valid, jax.random.uniform(k_perm, (num, self.n_max)), 2.0), axis=1)
        operands = jnp.take_along_axis(digits, order, axis=1)
        ops = jax.random.randint(k_ops, (num, self.n_max), 0, 3)
        target = _evaluate_left_to_right(operands, ops, n)

        sign = jnp.where(target < 0, MINUS, PLUS)
        magnitude = jnp.abs(target)
        target_digits = jnp.stack([(magnitude // 10**p) % 10 for p in (3, 2, 1, 0)], axis=1)
        body = jnp.concatenate([
            jnp.full((num, 1), BOS), DIGIT0 + digits, jnp.full((num, 1), EQUALS), sign[:, None],
            DIGIT0 + target_digits, jnp.full((num, 1), SEP)], axis=1)
        # move "=" and the target right after the n-th digit: gather from the full body
        column = jnp.arange(self.n_max + 8)[None]
        shift = self.n_max - n[:, None]
        source = jnp.where(column <= n[:, None], column, column + shift)
        body = jnp.take_along_axis(body, jnp.clip(source, 0, self.n_max + 7), axis=1)
        prompts = left_pad(body, n + 8, self.prompt_len)

        noisy_ops = jax.random.bernoulli(k_opn, self.corpus_op_noise, ops.shape)
        ops = jnp.where(noisy_ops, jax.random.randint(k_opr, ops.shape, 0, 3), ops)
        noisy_digits = jax.random.bernoulli(k_dn, self.corpus_digit_noise, operands.shape)
        operands = jnp.where(noisy_digits, jax.random.randint(k_dr, operands.shape, 1, 10), operands)
        op_tokens = jnp.asarray([PLUS, MINUS, TIMES])[ops]
        i = jnp.arange(self.max_response_len)[None]
        expression = jnp.where(
            i % 2 == 0,
            DIGIT0 + jnp.take_along_axis(operands, jnp.clip(i // 2, 0, self.n_max - 1), axis=1),
            jnp.take_along_axis(op_tokens, jnp.clip(i // 2, 0, self.n_max - 1), axis=1))
        end = 2 * n[:, None] - 1
        responses = jnp.where(i < end, expression, jnp.where(i == end, EOS, PAD))
        return prompts, responses.astype(jnp.int32)

    def sample_prompts(self, key, num: int, split: str = "train") -> jax.Array:
        return _select_split(key, num, split, self._generate)[0]

    def base_corpus(self, key, num: int) -> tuple[jax.Array, jax.Array]:
        return _select_split(key, num, "train", self._generate)

    def score(self, prompts, responses) -> TaskScore:
        p = self.prompt_len
        tail = prompts[:, p - 5: p - 1]
        target = jnp.sum((tail - DIGIT0) * jnp.asarray([1000, 100, 10, 1]), axis=1)
        target = jnp.where(prompts[:, p - 6] == MINUS, -target, target)
        prompt_digits = prompts[:, : p - 7]
        lengths, truncated = response_lengths(responses)
        num_tokens = lengths - 1  # expression tokens before EOS
        i = jnp.arange(self.max_response_len)[None]
        inside = i < num_tokens[:, None]
        is_digit = (responses >= DIGIT0) & (responses < DIGIT0 + 10)
        is_op = (responses == PLUS) | (responses == MINUS) | (responses == TIMES)
        well_formed = jnp.all(~inside | jnp.where(i % 2 == 0, is_digit, is_op), axis=1)
        parseable = (~truncated) & (num_tokens % 2 == 1) & well_formed
        m = (num_tokens + 1) // 2
        operands = responses[:, 0::2][:, : self.n_max] - DIGIT0
        op_index = jnp.select([responses[:, 1::2] == PLUS, responses[:, 1::2] == MINUS], [0, 1], 2)
        op_index = jnp.pad(op_index, ((0, 0), (0, self.n_max - op_index.shape[1])))[:, : self.n_max]
        value = _evaluate_left_to_right(operands, op_index, m)
        digit_ids = jnp.arange(10)[None, :, None]
        used = jnp.sum((responses[:, None, :] == DIGIT0 + digit_ids) & inside[:, None, :], axis=2)
        given = jnp.sum(prompt_digits[:, None, :] == DIGIT0 + digit_ids, axis=2)
        correct = parseable & jnp.all(used == given, axis=1) & (value == target)
        reward = jnp.where(correct, 1.0, jnp.where(parseable, 0.1, 0.0)).astype(jnp.float32)
        return TaskScore(reward, correct, truncated, lengths)


def _evaluate_left_to_right(operands: jax.Array, ops: jax.Array, count: jax.Array) -> jax.Array:
    """((o_0 op_0 o_1) op_1 o_2) ... over the first ``count[i]`` operands of each row; ``ops[:, j]`` in
    {0: +, 1: -, 2: *} joins operand j + 1 (shapes ``[N, K]``, ``[N, K]``, ``[N]``)."""
    value = operands[:, 0]
    for j in range(1, operands.shape[1]):
        o = operands[:, j]
        op = ops[:, j - 1]
        new = jnp.where(op == 0, value + o, jnp.where(op == 1, value - o, value * o))
        value = jnp.where(j < count, new, value)
    return value


TASKS = {
    "reverse": Reverse,
    "scratchpad_sum": ScratchpadSum,
    "constrained_string": ConstrainedString,
    "countdown_lite": CountdownLite,
}


def make_task(name: str, **knobs):
    """The task called ``name`` (one of ``TASKS``) with its difficulty and corpus knobs overridden."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**knobs)
