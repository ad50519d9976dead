"""Backends: options, TLS, the pipelined connection and its state machine, pools, hashing."""
