"""Test set-up: 8 simulated CPU devices, float32 matmuls at full precision.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test session, shared by the test
# workers and the processes tests start (launchers, multi-host runs and
# resumed runs compile the same small programs again in fresh processes).
# Made here, in the first process, and inherited by the others; removed when
# that process ends, so no run reads an entry an earlier run wrote.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="skipside-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
