"""Memory and cost planning: which ZeRO stage fits a run, and what a step costs per GPU."""

from mosa_scale.plan.planner import Hardware, format_plan, plan_run, simulate_zero3, zero_settings
from mosa_scale.plan.trace import StepTrace, trace_step

__all__ = ["Hardware", "StepTrace", "format_plan", "plan_run", "simulate_zero3", "trace_step", "zero_settings"]
