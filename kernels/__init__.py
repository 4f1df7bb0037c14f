"""Compute kernels: Triton kernels with hand-written backward passes and their torch references.

Import this package anywhere: without a GPU or without triton installed, the torch
reference path still works. The engine uses only :mod:`tritonlm.kernels.dispatch`.
"""
