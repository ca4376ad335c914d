"""mae_jax.preload: `python -m mae_jax.main` re-executes itself under tcmalloc, once, same pid."""

import os
import subprocess
import sys

import pytest

from mae_jax import preload

_PROBE = r"""
import os
print("pid", os.getpid(), flush=True)
from mae_jax import preload
preload.reexec_with_tcmalloc()
maps = open("/proc/self/maps").read()
print("tcmalloc mapped", "tcmalloc" in maps)
print(preload.allocator())
"""

needs_tcmalloc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or preload.find_tcmalloc() is None,
    reason="no tcmalloc library here (Debian: apt-get install libtcmalloc-minimal4)")


def _probe(**env):
  environ = {k: v for k, v in os.environ.items() if k not in (preload.ENV, "LD_PRELOAD")}
  return subprocess.run([sys.executable, "-c", _PROBE], env={**environ, **env}, check=True,
                        capture_output=True, text=True, timeout=60).stdout.splitlines()


@needs_tcmalloc
def test_reexec_loads_tcmalloc_once_in_the_same_process():
  lines = _probe()
  pids = [line for line in lines if line.startswith("pid ")]
  assert len(pids) == 2 and pids[0] == pids[1], lines  # before and after the exec: one pid
  assert "tcmalloc mapped True" in lines, lines
  assert lines[-1].startswith("malloc: tcmalloc (libtcmalloc"), lines


def test_env_var_zero_keeps_the_platform_allocator():
  lines = _probe(**{preload.ENV: "0"})
  assert len([line for line in lines if line.startswith("pid ")]) == 1, lines  # no exec
  assert "tcmalloc mapped False" in lines, lines
  assert lines[-1] == "malloc: the platform's (MAE_JAX_TCMALLOC=0)", lines


def test_an_existing_preload_is_left_alone():
  calls = []
  preload.reexec_with_tcmalloc(environ={"LD_PRELOAD": "libjemalloc.so.2"},
                               execve=lambda *a: calls.append(a))
  assert not calls
