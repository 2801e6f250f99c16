"""Helpers shared by the test modules: builders, child-process entry points and process drivers.

Test modules import them as ``helpers.<module>``: pytest's default ``prepend`` import mode puts
``tests/`` (the first folder without an ``__init__.py``) on ``sys.path``, and conftest makes sure of
it. Children started with multiprocessing's ``spawn`` get the parent's ``sys.path``, so entry points
such as ``helpers.store_procs.writer_main`` or ``helpers.bus_peers.peer_main`` import the same way
there. A plain subprocess script needs ``PYTHONPATH`` to name ``tests/`` (see ``TESTS``).

Nothing here is collected as a test (no ``test_*`` names), and nothing imports pytest, so spawned
children start fast.
"""
from __future__ import annotations

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
