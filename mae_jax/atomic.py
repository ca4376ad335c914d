"""Outputs that appear whole or not at all: built under a temporary name, renamed on success."""

import os
import shutil
import tempfile


class AtomicOutput:
  """Build `path` under a temporary name beside it; rename into place only on success."""

  def __init__(self, path, overwrite, is_dir):
    self.path = os.path.abspath(os.fspath(path))
    self.overwrite, self.is_dir = overwrite, is_dir

  def __enter__(self):
    if os.path.exists(self.path) and not self.overwrite:
      raise FileExistsError(f"{self.path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    name = "." + os.path.basename(self.path) + ".tmp-"
    if self.is_dir:
      self.tmp = tempfile.mkdtemp(prefix=name, dir=parent)
    else:
      fd, self.tmp = tempfile.mkstemp(prefix=name, dir=parent)
      os.close(fd)
    umask = os.umask(0)
    os.umask(umask)  # temp files are private; the result gets the usual permissions
    os.chmod(self.tmp, (0o777 if self.is_dir else 0o666) & ~umask)
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      _remove(self.tmp)
      return False
    if os.path.isdir(self.path) and not os.path.islink(self.path):
      shutil.rmtree(self.path)
    os.replace(self.tmp, self.path)
    return False


def _remove(path):
  """Delete a file or folder if it exists."""
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)

