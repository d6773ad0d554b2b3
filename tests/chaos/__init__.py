"""The chaos harness: a real ``fednode start`` process killed at random under a task stream.

``python -m tests.chaos`` (or ``scripts/chaos``) runs one campaign; ``tests/chaos/test_chaos.py``
runs a CI-sized one. See ``docs/testing.md``.
"""
