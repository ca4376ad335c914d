"""Walking jaxprs in tests: every equation, nested calls (pjit, custom_jvp, scan ...) included."""

from jax.extend import core as jax_core


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def equations(jaxpr, repeat=1):
  """(equation, times it runs) for every equation of `jaxpr` and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn, repeat
    times = repeat * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        yield from equations(sub, times)
