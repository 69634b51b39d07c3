"""Loaded at interpreter start by processes that have tests/hooks on PYTHONPATH (the daemons
some integration tests start): installs the test hooks their environment asks for."""

import m4d_test_hooks

m4d_test_hooks.install_from_environment()
