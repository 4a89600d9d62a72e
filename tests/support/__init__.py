"""Helpers shared by the tests of every kind (tests/unit, actors, net, e2e).

pyproject's `pythonpath = ["tests"]` makes this package importable as `support`; test modules
import what they use (`from support.ports import free_port`), conftest.py files hold only fixtures.
"""
