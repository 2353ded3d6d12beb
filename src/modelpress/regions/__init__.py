"""Compute and storage regions: a placement plan under a memory budget and streamed execution from the store."""

from modelpress.regions.plan import PlacementPlan, Placement, Region, parse_memory, place
from modelpress.regions.ring import Ring, Unit
from modelpress.regions.streaming import StreamedModel, open_streamed, plan_version

__all__ = ["PlacementPlan", "Placement", "Region", "Ring", "StreamedModel", "Unit", "open_streamed", "parse_memory",
           "place", "plan_version"]
