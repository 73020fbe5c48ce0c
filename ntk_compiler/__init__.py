"""ntk_compiler: fast, exact finite-width Neural Tangent Kernels for JAX functions."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it. The modules (and JAX with them) load on
# first use of a name, so `python -m ntk_compiler --help` answers without importing JAX.
_EXPORTS = {
    "METHODS": "api", "NTKFunction": "api", "compile_ntk": "api",
    "RuleCheck": "check", "RuleCheckError": "check", "check_rule": "check",
    "Explanation": "inspect",
    "EqnInfo": "rules", "RuleResult": "rules", "register_rule": "rules",
    "rules_overlay": "rules", "unregister_rule": "rules",
    "Structure": "structure",
    "RuleReport": "validate", "ValidationError": "validate", "Verification": "validate",
    "ScaleEstimate": "scale", "Tiling": "scale",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'ntk_compiler' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"ntk_compiler.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the names for type checkers and IDEs
  from ntk_compiler.api import METHODS, NTKFunction, compile_ntk
  from ntk_compiler.check import RuleCheck, RuleCheckError, check_rule
  from ntk_compiler.inspect import Explanation
  from ntk_compiler.rules import (EqnInfo, RuleResult, register_rule, rules_overlay,
                                  unregister_rule)
  from ntk_compiler.scale import ScaleEstimate, Tiling
  from ntk_compiler.structure import Structure
  from ntk_compiler.validate import RuleReport, ValidationError, Verification
