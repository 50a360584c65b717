"""The tests in this folder run in a pytest process of their own, with 8 CPU devices:

    python -m pytest -q tests/multidevice

JAX fixes its number of devices when its backend starts, so this conftest asks for 8 CPU
devices as pytest loads it, before any test module is imported and before any JAX operation.
The main run (``python -m pytest -n 2 -q``) leaves this folder out (``collect_ignore`` in
``tests/conftest.py``): in its processes JAX has one device.
"""

from __future__ import annotations

import jax
import pytest

DEVICES = 8

try:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", DEVICES)
except RuntimeError as e:  # the backend has started already, with its own device count
  raise RuntimeError(
    f"tests/multidevice needs JAX with {DEVICES} CPU devices, but JAX's backend started before"
    " this folder's conftest.py could ask for them. Run this folder in a pytest process of"
    " its own: python -m pytest -q tests/multidevice"
  ) from e


@pytest.fixture(autouse=True, scope="session")
def eight_cpu_devices():
  """Fails every test here, saying why, if JAX did not start with the 8 CPU devices."""
  devices = jax.devices()
  if len(devices) != DEVICES or devices[0].platform != "cpu":
    pytest.fail(
      f"tests/multidevice needs {DEVICES} CPU devices, JAX has {devices}: run this folder in"
      " a pytest process of its own (python -m pytest -q tests/multidevice)",
      pytrace=False,
    )
