"""The contract between the serving plane and everyone who talks to it.

`wire`: the control-channel messages (coordinator <-> HMMs <-> executors), memory handles
and typed handover state. `admin`: the admin API's bodies (status, scale request, scale
record, phase and outcome enums), shared with the operator and the CLI.

Imports msgspec and the standard library only (no torch, no zmq, no threads): the operator
imports this package and nothing else of the worker (a test enforces both).
"""
