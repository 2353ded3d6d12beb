"""Compression passes, registered by name so that recipes can use them."""

from modelpress.passes.base import PASSES, PassContext, Target, pass_for, register_pass
from modelpress.passes.quantize import DynamicInt8Config, RangeSearch, RTNConfig

__all__ = ["PASSES", "PassContext", "Target", "pass_for", "register_pass", "DynamicInt8Config", "RangeSearch", "RTNConfig"]
