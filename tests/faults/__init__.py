"""The fault drills.

A package, so that pytest imports its conftest as ``faults.conftest``, and ``from conftest import ...``
in the other test modules keeps finding tests/conftest.py.
"""
