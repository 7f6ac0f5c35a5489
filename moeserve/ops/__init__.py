"""Ops: the one place that chooses an op's implementation for a device and a weight format.

Layers call these functions instead of branching on `x.is_cuda` in their forwards: on CUDA the
Triton kernels (moeserve.kernels), elsewhere the torch reference, which is the specification the
kernels are tested against. A function takes tensors, or the layer itself (duck-typed) when the
reference is the layer's `reference` method. Kernel modules are imported inside the CUDA branch,
so a CPU install runs without Triton. One module per op family: moe.py (routing, experts).
Dependencies point one way: layers -> ops -> kernels; ops import no layer.
"""
