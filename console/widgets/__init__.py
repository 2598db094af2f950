"""Widgets of the console: each draws one part of a RunSnapshot."""
