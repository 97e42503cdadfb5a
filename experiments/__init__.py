"""End-to-end experiments: typed configs, jitted training over seeds, run folders, figures.

Importing this package sets XLA's flags before JAX starts, in this one place: XLA:CPU's
concurrency-optimised scheduler can stall long vmapped runs on small machines (see the README).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")
