"""Shared runtime of every role: server bootstrap, auth, metrics, config, the tensor codec."""
