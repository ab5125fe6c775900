"""Shared core: tick model, settings, key names, Redis/QuestDB helpers, metrics, lifecycle."""
