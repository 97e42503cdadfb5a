"""A toy task with a graded hidden ("gold") reward, and Bradley-Terry preference labels on it (RLHF).

The RLHF pipeline of 004 ("PPO - RLHF") and InstructGPT (Ouyang et al. 2022) needs a reward that nobody
can read off directly: humans only say which of two responses they prefer. Here the "human" is a fixed,
smooth, jittable gold score of a response; preference labels are drawn from it by the Bradley-Terry model

    P(y_a preferred to y_b | x) = sigmoid((g(x, y_a) - g(x, y_b)) / temperature)          (BT, 1952)

so ``temperature`` is the label-noise knob (-> 0: the noiseless gold order). Nothing in ``envs`` learns;
sampling the responses to compare is the experiment's job (``experiments/rlhf.py``), this module only
defines the task and labels given gold scores.

``GradedLetters`` (prompt ``^ab5|``: liked letter ``a``, disliked letter ``b``, target length 5). The
response is free text over the vocabulary of ``envs.text_tasks`` (letters a-d, digits, ``.``) ended by EOS.
Its gold reward is a weighted sum of token, bigram and length terms with structure that a reward model fit
on the SFT policy's samples learns only partly (Gao, Schulman, Hilton 2022 study exactly this gap):

    g(x, y) =   w_like c_like                                 liked-letter count
              - w_dislike c_dislike                           disliked-letter count
              + w_neutral c_neutral                           the two other letters
              + w_bigram #(liked letter followed by a digit)  a bigram preference
              - w_filler c_filler                             ``.`` tokens
              - w_length (L - k)^2                            length L (EOS excluded) against the target k
              - w_repeat sum_v max(0, c_v - s)^2              repetition: any token used more than s times
              - truncation_penalty [no EOS]

with c_* token counts in the response (c_v: of token v). The SFT corpus (``base_corpus``) draws every
token independently from a prompt-aware mixture with a broad length range, so the warm-started policy has
a broad spread of gold scores, but it seldom repeats a token more than s times: preference pairs carry
little evidence of the repetition term, a reward model fit on them learns "more liked letters is better"
and an optimiser that pushes far from the SFT policy finds the region where gold falls (the repetition
that reward-hacked policies are known for; Gao, Schulman, Hilton 2022 measure this gap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from envs.text_tasks import (
    BOS,
    DIGIT0,
    EOS,
    FILLER,
    LETTER_A,
    PAD,
    SEP,
    VOCAB_SIZE,
    TaskScore,
    _select_split,
    response_lengths,
)

NUM_LETTERS = 4


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class GradedLetters:
    """Free-text responses scored by a hidden graded reward (see the module docstring for the formula).

    Prompt ``[PAD] BOS liked disliked k SEP`` (``prompt_len`` 5): two distinct letters of a-d and a target
    length digit k in [length_min, length_max]; 4 x 3 x (length_max - length_min + 1) distinct prompts, about
    one in five of them in the test split (the fixed hash of ``envs.text_tasks``).
    """

    length_min: int = 3
    """smallest target length k in a prompt."""
    length_max: int = 8
    """largest target length k."""
    max_response_len: int = 12
    """response width in tokens, EOS included (longer answers are truncated)."""
    w_like: float = 0.6
    """reward per liked letter."""
    w_dislike: float = 0.5
    """penalty per disliked letter."""
    w_neutral: float = 0.2
    """reward per letter that is neither liked nor disliked."""
    w_bigram: float = 0.4
    """reward per liked letter immediately followed by a digit."""
    w_filler: float = 0.2
    """penalty per ``.`` token."""
    w_length: float = 0.1
    """weight of the squared distance of the length from the target k."""
    w_repeat: float = 0.5
    """weight of the squared excess of every token count over repeat_allowance."""
    repeat_allowance: int = 2
    """s: how often a token may appear before the repetition term starts."""
    truncation_penalty: float = 1.0
    """extra penalty for a response without EOS."""
    good_threshold: float = 2.0
    """gold score from which a response counts as ``correct`` in ``score`` (pass@k bookkeeping only)."""
    corpus_liked: float = 0.15
    """SFT corpus: probability that a token is the liked letter."""
    corpus_disliked: float = 0.15
    """SFT corpus: probability that a token is the disliked letter."""
    corpus_neutral: float = 0.2
    """SFT corpus: probability that a token is one of the two neutral letters."""
    corpus_filler: float = 0.1
    """SFT corpus: probability that a token is ``.`` (the rest are uniform digits)."""
    corpus_length_min: int = 1
    """SFT corpus: shortest response (tokens before EOS)."""
    corpus_length_max: int = 10
    """SFT corpus: longest response (tokens before EOS; below max_response_len)."""
    name: str = "graded_letters"

    def __post_init__(self):
        _check(1 <= self.length_min <= self.length_max <= 9,
               f"need 1 <= length_min <= length_max <= 9, got [{self.length_min}, {self.length_max}]")
        _check(self.length_max < self.max_response_len <= 32,
               f"max_response_len must lie in (length_max, 32], got {self.max_response_len}")
        _check(1 <= self.corpus_length_min <= self.corpus_length_max < self.max_response_len,
               f"need 1 <= corpus_length_min <= corpus_length_max < max_response_len, got "
               f"[{self.corpus_length_min}, {self.corpus_length_max}]")
        _check(self.repeat_allowance >= 0, f"repeat_allowance must be >= 0, got {self.repeat_allowance}")
        probs = (self.corpus_liked, self.corpus_disliked, self.corpus_neutral, self.corpus_filler)
        _check(min(probs) >= 0 and sum(probs) <= 1, f"corpus token probabilities must be >= 0 with sum <= 1, "
               f"got {probs}")

    @property
    def prompt_len(self) -> int:
        return 5

    def _make_prompts(self, key, num):
        k_like, k_dis, k_len = jax.random.split(key, 3)
        liked = jax.random.randint(k_like, (num,), 0, NUM_LETTERS)
        disliked = (liked + jax.random.randint(k_dis, (num,), 1, NUM_LETTERS)) % NUM_LETTERS
        target = jax.random.randint(k_len, (num,), self.length_min, self.length_max + 1)
        full = jnp.full((num,), 1)
        prompts = jnp.stack([PAD * full, BOS * full, LETTER_A + liked, LETTER_A + disliked, DIGIT0 + target,
                             SEP * full], axis=1)[:, 1:]
        return (prompts.astype(jnp.int32),)

    def sample_prompts(self, key, num: int, split: str = "train") -> jax.Array:
        """``[num, 5]`` prompts of ``split`` (train, test or all)."""
        return _select_split(key, num, split, self._make_prompts)[0]

    def parse_prompts(self, prompts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(liked, disliked, target)`` ``[N]`` int32: liked and disliked letters as 0..3, target length."""
        return (prompts[:, 1] - LETTER_A, prompts[:, 2] - LETTER_A, prompts[:, 3] - DIGIT0)

    def features(self, prompts: jax.Array, responses: jax.Array) -> dict[str, jax.Array]:
        """The counts the gold reward is built from, each ``[N]`` float32 (responses ``[N, L]``, tokens
        after the first EOS ignored): liked, disliked, neutral letters, liked-then-digit bigrams, fillers,
        the length L (EOS excluded), truncation, and the repetition excess sum_v max(0, c_v - s)^2."""
        liked, disliked, _ = self.parse_prompts(prompts)
        lengths, truncated = response_lengths(responses)
        body_len = jnp.where(truncated, lengths, lengths - 1)
        inside = jnp.arange(responses.shape[1])[None] < body_len[:, None]
        is_letter = (responses >= LETTER_A) & (responses < LETTER_A + NUM_LETTERS) & inside
        is_liked = is_letter & (responses == LETTER_A + liked[:, None])
        is_disliked = is_letter & (responses == LETTER_A + disliked[:, None])
        is_digit = (responses >= DIGIT0) & (responses < DIGIT0 + 10) & inside
        bigram = is_liked[:, :-1] & is_digit[:, 1:]
        ordinary = inside & (responses > max(PAD, BOS, SEP, EOS))  # special tokens are never counted
        per_token = jnp.sum((responses[:, :, None] == jnp.arange(VOCAB_SIZE)) & ordinary[:, :, None], axis=1)
        excess = jnp.maximum(per_token - self.repeat_allowance, 0).astype(jnp.float32)

        def count(x):
            return jnp.sum(x, axis=1).astype(jnp.float32)

        return {
            "liked": count(is_liked),
            "disliked": count(is_disliked),
            "neutral": count(is_letter & ~is_liked & ~is_disliked),
            "bigram": count(bigram),
            "filler": count((responses == FILLER) & inside),
            "length": body_len.astype(jnp.float32),
            "truncated": truncated.astype(jnp.float32),
            "repetition": jnp.sum(excess**2, axis=1),
        }

    def gold_reward(self, prompts: jax.Array, responses: jax.Array) -> jax.Array:
        """The hidden gold reward g(x, y) ``[N]`` float32 of the module docstring; prompts ``[N, 5]``,
        responses ``[N, max_response_len]``."""
        f = self.features(prompts, responses)
        _, _, target = self.parse_prompts(prompts)
        return (self.w_like * f["liked"]
                - self.w_dislike * f["disliked"]
                + self.w_neutral * f["neutral"]
                + self.w_bigram * f["bigram"]
                - self.w_filler * f["filler"]
                - self.w_length * (f["length"] - target.astype(jnp.float32)) ** 2
                - self.w_repeat * f["repetition"]
                - self.truncation_penalty * f["truncated"])

    def score(self, prompts: jax.Array, responses: jax.Array) -> TaskScore:
        """``TaskScore``: the gold reward, ``correct`` = gold >= good_threshold, truncation, length."""
        gold = self.gold_reward(prompts, responses)
        lengths, truncated = response_lengths(responses)
        return TaskScore(gold, gold >= self.good_threshold, truncated, lengths)

    def base_corpus(self, key, num: int) -> tuple[jax.Array, jax.Array]:
        """``(prompts [num, 5], responses [num, max_response_len])``: the SFT corpus. Lengths uniform in
        [corpus_length_min, corpus_length_max]; each token independently the liked letter, the disliked
        letter, a neutral letter, ``.`` or a uniform digit with the corpus probabilities."""
        k_prompt, k_len, k_kind, k_neutral, k_digit = jax.random.split(key, 5)
        prompts = self.sample_prompts(k_prompt, num, "train")
        liked, disliked, _ = self.parse_prompts(prompts)
        width = self.max_response_len
        lengths = jax.random.randint(k_len, (num,), self.corpus_length_min, self.corpus_length_max + 1)
        p_digit = 1.0 - self.corpus_liked - self.corpus_disliked - self.corpus_neutral - self.corpus_filler
        probs = jnp.asarray([self.corpus_liked, self.corpus_disliked, self.corpus_neutral, self.corpus_filler,
                             max(p_digit, 0.0)])
        kind = jax.random.categorical(k_kind, jnp.log(probs + 1e-30), shape=(num, width))
        # neutral letters: the two letters that are neither liked nor disliked, in order
        others = jnp.sort(jnp.where(jnp.arange(NUM_LETTERS)[None] == liked[:, None], 9,
                                    jnp.where(jnp.arange(NUM_LETTERS)[None] == disliked[:, None], 9,
                                              jnp.arange(NUM_LETTERS)[None])), axis=1)[:, :2]
        pick = jax.random.randint(k_neutral, (num, width), 0, 2)
        neutral = jnp.take_along_axis(others, pick, axis=1)
        digits = DIGIT0 + jax.random.randint(k_digit, (num, width), 0, 10)
        tokens = jnp.select(
            [kind == 0, kind == 1, kind == 2, kind == 3],
            [jnp.broadcast_to(LETTER_A + liked[:, None], (num, width)),
             jnp.broadcast_to(LETTER_A + disliked[:, None], (num, width)), LETTER_A + neutral,
             jnp.full((num, width), FILLER)],
            digits)
        column = jnp.arange(width)[None]
        responses = jnp.where(column < lengths[:, None], tokens,
                              jnp.where(column == lengths[:, None], EOS, PAD))
        return prompts, responses.astype(jnp.int32)


class PreferencePairs(NamedTuple):
    """Labelled comparisons, leaves ``[N, ...]``: prompts ``[N, P]``, chosen and rejected responses
    ``[N, L]``, their gold rewards ``[N]`` and the Bradley-Terry probability ``[N]`` of the label drawn."""

    prompts: jax.Array
    chosen: jax.Array
    rejected: jax.Array
    gold_chosen: jax.Array
    gold_rejected: jax.Array
    label_prob: jax.Array


def bradley_terry_prob(gold_a: jax.Array, gold_b: jax.Array, temperature: float) -> jax.Array:
    """P(a preferred to b) = sigmoid((g_a - g_b) / temperature) (Bradley and Terry 1952; the preference
    model of Christiano et al. 2017 and InstructGPT eq. 1), any equal shapes. Follows the input dtype."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return jax.nn.sigmoid((gold_a - gold_b) / temperature)


def label_pairs(key: jax.Array, prompts: jax.Array, responses_a: jax.Array, responses_b: jax.Array,
                gold_a: jax.Array, gold_b: jax.Array, temperature: float) -> PreferencePairs:
    """Draw one Bradley-Terry label per comparison and order each pair as (chosen, rejected).

    Args:
      key: PRNG key; the labels are a deterministic function of it.
      prompts: ``[N, P]``; responses_a, responses_b: ``[N, L]``, two responses to each prompt.
      gold_a, gold_b: ``[N]`` gold rewards of the two responses.
      temperature: BT temperature (> 0); small values give the noiseless gold order (ties: a fair coin).

    Returns:
      ``PreferencePairs`` with ``label_prob`` the BT probability of the label that was drawn.
    """
    prob_a = bradley_terry_prob(gold_a, gold_b, temperature)
    a_wins = jax.random.uniform(key, prob_a.shape, prob_a.dtype) < prob_a
    pick = a_wins[:, None]
    return PreferencePairs(
        prompts,
        jnp.where(pick, responses_a, responses_b),
        jnp.where(pick, responses_b, responses_a),
        jnp.where(a_wins, gold_a, gold_b),
        jnp.where(a_wins, gold_b, gold_a),
        jnp.where(a_wins, prob_a, 1.0 - prob_a),
    )
