"""Run the process under tcmalloc when the machine has it (Linux): about 1.25x on CPU.

XLA:CPU frees and re-allocates its buffers every step, from several threads. glibc's malloc
gives large freed blocks back to the kernel, so the next step page-faults them in again as
fresh zeroed pages (ViT-B/16 batch 8 on 2 cores: 420k faults and 0.8 s of system time per
3.6 s step). tcmalloc keeps them: 369 faults, and `python -m mae_jax.main` ran the same steps
at 2.57-2.61 instead of 2.01-2.11 img/s (benchmarks/RESULTS.md, 2026-12-02). glibc's own
knobs (one arena, no mmap, no trim) remove the faults too but serialise the input
pipeline's threads on one lock: slower overall, so they are not used.

`reexec_with_tcmalloc()` re-executes the same command line (same pid) with
LD_PRELOAD=libtcmalloc_minimal.so.4 set, once, before anything else starts. It does nothing
when LD_PRELOAD is already set, off Linux, when no tcmalloc library is installed (Debian /
Ubuntu: `apt-get install libtcmalloc-minimal4`), or when MAE_JAX_TCMALLOC=0.
"""

import ctypes.util
import os
import sys

ENV = "MAE_JAX_TCMALLOC"
_NAMES = ("tcmalloc_minimal", "tcmalloc")


def find_tcmalloc():
  """The soname of an installed tcmalloc library, or None."""
  for name in _NAMES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def allocator():
  """One line for the log: which malloc this process runs on."""
  preload = os.environ.get("LD_PRELOAD", "")
  if "tcmalloc" in preload:
    return f"malloc: tcmalloc ({preload})"
  if preload:
    return f"malloc: LD_PRELOAD={preload}"
  if os.environ.get(ENV) == "0":
    return f"malloc: the platform's ({ENV}=0)"
  if sys.platform.startswith("linux"):
    return ("malloc: glibc (slower on CPU: page faults every step; `apt-get install "
            "libtcmalloc-minimal4` and mae_jax.main runs under tcmalloc)")
  return "malloc: the platform's"


def reexec_with_tcmalloc(environ=os.environ, execve=os.execve):
  """Replace this process by the same command under tcmalloc, where that applies (see above)."""
  if (environ.get("LD_PRELOAD") or environ.get(ENV) == "0"
      or not sys.platform.startswith("linux")):
    return
  library = find_tcmalloc()
  if library is None:
    return
  environ["LD_PRELOAD"] = library
  # tcmalloc reports each allocation over 1 GiB on stderr; a big model makes many.
  environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, argv, environ)
