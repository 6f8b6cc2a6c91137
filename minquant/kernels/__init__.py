"""Dequantize-and-multiply kernels for QuantLinear. For now the torch reference (reference.py);
the fused Triton kernel of notebook 06 will be chosen here for CUDA tensors."""
from minquant.kernels.reference import dequant_matmul

__all__ = ["dequant_matmul"]
