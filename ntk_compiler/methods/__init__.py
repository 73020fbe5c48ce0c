"""The reference methods: Jacobian contraction and NTK-vector products."""

from ntk_compiler.methods.common import Problem
from ntk_compiler.methods.jacobian import jacobian_ntk
from ntk_compiler.methods.ntk_vp import ntk_vp_ntk

__all__ = ["Problem", "jacobian_ntk", "ntk_vp_ntk"]
