"""experiments/claims_sampled.py at a tiny size: one setting's sampled runs against its exact prediction."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import claims_sampled as cs
from polygrad import losses
from polygrad import tabular_sequences as ts


def test_sampled_runs_follow_the_exact_prediction():
    """With many groups per update, the sampled SGD runs stay near the exact expected-update trajectory
    (the clip-higher setting, 2 updates of 2 epochs x 2 minibatches), and their seeds differ."""
    space = ts.enumerate_responses(4, 2)
    logits0 = jnp.asarray(cs.clip_policy())
    rewards = (space.tokens[:, 0] == cs.A).astype(jnp.float32)[None]
    observe = cs._first_token_observer(space, rewards)
    setting = cs.Setting(losses.resolve("dapo"), 4, 64, epochs=2, minibatches=2, step_size=1.0)
    sampled, exact = cs.run_both(space, setting, 2, observe, jax.random.key(0),
                                 (logits0, rewards, jnp.ones_like(logits0)), num_seeds=2)
    p_sampled, p_exact = sampled["first_token_probs"][:, :, 0, cs.A], exact["first_token_probs"][:, 0, cs.A]
    assert p_sampled.shape == (2, 3) and p_exact.shape == (3,)
    np.testing.assert_allclose(p_sampled[:, 0], p_exact[0])
    assert np.all(p_exact[1:] > p_exact[0])  # the rare correct token grows
    np.testing.assert_allclose(p_sampled[:, -1], p_exact[-1], rtol=0.5)
    assert p_sampled[0, -1] != p_sampled[1, -1]
    summary = cs._compare(p_sampled[:, -1] + 1.0, p_sampled[:, -1])
    assert summary["separated"] and abs(summary["difference"] - 1.0) < 1e-6
