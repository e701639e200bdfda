"""Agents: loops built from sessions and hooks."""

from .think_draw import AgentResult, Attempt, ThinkDrawAgent

__all__ = ["AgentResult", "Attempt", "ThinkDrawAgent"]
