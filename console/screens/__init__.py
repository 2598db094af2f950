"""Screens of the console: the run (fleet, logs, results, plots), the picker, and small dialogs."""
