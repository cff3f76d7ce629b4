"""Load tests for hangon; kept out of the pytest run (see README.md in this folder)."""
