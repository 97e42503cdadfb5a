"""Test-suite set-up shared by every layer."""

import experiments  # noqa: F401, I001  (first: sets XLA's flags before JAX starts)

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", False)

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole session, shared by the pytest-xdist workers and by
    the subprocesses that tests start (they inherit the variable): a program that several tests compile
    (a run and its resumed copy in another process, the same tiny config in several run-folder tests)
    is compiled once. The first process to configure creates it; the workers inherit its variable."""
    if CACHE_VARIABLE not in os.environ:
        os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="polygrad-tests-xla-cache-")
        config.stash[_OWNED_CACHE] = os.environ[CACHE_VARIABLE]
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])


def pytest_unconfigure(config):
    if _OWNED_CACHE in config.stash:
        shutil.rmtree(config.stash[_OWNED_CACHE], ignore_errors=True)


_OWNED_CACHE = pytest.StashKey[str]()


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort, the same on every worker), so that the long ones start early
    and the short ones fill the workers' time around them, instead of a long test starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(params=[False, True], ids=["nojit", "jit"])
def maybe_jit(request):
    """Parameterise a test over eager and jitted execution (as rlax's tests do)."""
    return jax.jit if request.param else (lambda f, **kw: f)
