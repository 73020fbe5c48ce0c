"""ntk_compiler: fast, exact finite-width Neural Tangent Kernels for JAX functions."""

from ntk_compiler.api import METHODS, NTKFunction, compile_ntk
from ntk_compiler.rules import register_rule

__all__ = ["METHODS", "NTKFunction", "compile_ntk", "register_rule"]
__version__ = "0.1.0"
