"""Modules the tests share (imported as helpers.NAME; tests/conftest.py puts tests/ on the path)."""
