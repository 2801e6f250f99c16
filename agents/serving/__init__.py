"""Serving a grown system: every task from one process, each shared frozen prefix computed once.

``plan``: the served models as a prefix tree; ``loader``: models from the store through the lazy view;
``server``: the live engine (follows the store, swaps plans, micro-batches). The HTTP layer is
``launch/serve_models.py``.
"""
