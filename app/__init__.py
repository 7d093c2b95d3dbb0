"""Processes and their wiring: CLI, launching workers, and later agents, discovery and the store."""
