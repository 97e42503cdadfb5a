"""Test-suite set-up shared by every layer."""

import experiments  # noqa: F401, I001  (first: sets XLA's flags before JAX starts)

import jax
import pytest

jax.config.update("jax_enable_x64", False)


@pytest.fixture(params=[False, True], ids=["nojit", "jit"])
def maybe_jit(request):
    """Parameterise a test over eager and jitted execution (as rlax's tests do)."""
    return jax.jit if request.param else (lambda f, **kw: f)
