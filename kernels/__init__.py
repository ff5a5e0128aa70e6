"""fastbridge's Triton kernels, installed as ``fastbridge.kernels`` (never as a top-level ``kernels``).

Each module holds @triton.jit kernels and launchers that take and return tensors; autograd, validation
and backend choice live in fastbridge/ops/. Nothing is imported here, so importing the package is free
of side effects.
"""
