"""One home per test scaffold: helpers that several test modules share (fixtures stay in the conftest.py files)."""
