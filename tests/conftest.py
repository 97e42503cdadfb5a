"""Test-suite set-up shared by every layer."""

import os

# Must be set before JAX is imported anywhere (see README, "Pitfalls").
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


@pytest.fixture(params=[False, True], ids=["nojit", "jit"])
def maybe_jit(request):
    """Parameterise a test over eager and jitted execution (as rlax's tests do)."""
    return jax.jit if request.param else (lambda f, **kw: f)
