"""ntk_compiler: fast, exact finite-width Neural Tangent Kernels for JAX functions."""

from ntk_compiler.api import METHODS, NTKFunction, compile_ntk
from ntk_compiler.check import RuleCheck, RuleCheckError, check_rule
from ntk_compiler.inspect import Explanation
from ntk_compiler.rules import (EqnInfo, RuleResult, register_rule, rules_overlay,
                                unregister_rule)
from ntk_compiler.structure import Structure
from ntk_compiler.validate import RuleReport, ValidationError, Verification

__all__ = ["METHODS", "EqnInfo", "Explanation", "NTKFunction", "RuleCheck",
           "RuleCheckError", "RuleReport", "RuleResult", "Structure", "ValidationError",
           "Verification", "check_rule", "compile_ntk", "register_rule", "rules_overlay",
           "unregister_rule"]
__version__ = "0.1.0"
