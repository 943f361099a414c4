"""Test set-up: 8 simulated CPU devices, float32 matmuls at full precision.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test session, shared by the test
# workers and the processes tests start (launchers, multi-host runs and
# resumed runs compile the same small programs again in fresh processes).
# Made in the first process (the xdist controller) and inherited through
# _CACHE_VAR by the others; removed when that process exits, so no run reads
# an entry an earlier run wrote (a JAX_COMPILATION_CACHE_DIR of the user's is
# overridden). Every program is cached, however fast it compiled. Two
# processes may race on one entry: JAX then warns, compiles it itself and
# computes the same.
_CACHE_VAR = "SKIPSIDE_TESTS_JAX_CACHE"
if _CACHE_VAR not in os.environ:
  os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="skipside-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_VAR]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each test module's compiled programs when it ends.

  XLA:CPU maps memory for every executable it loads (about 3.5 maps each);
  a test worker keeping thousands of them reached tens of thousands of maps
  (25,000 at 80% of the suite), toward the kernel's vm.max_map_count
  (65,530), and workers aborted inside backend_compile_and_load late in the
  suite. ``jax.clear_caches`` drops the jit caches that hold them.
  """
  yield
  jax.clear_caches()
  gc.collect()
