"""Helpers the tests share (imported by test modules and conftest.py; no tests here)."""
