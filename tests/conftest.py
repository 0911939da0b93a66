import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax  # noqa: E402

# Exactness checks run in float64; tests that check float32 behaviour cast explicitly.
jax.config.update("jax_enable_x64", True)
