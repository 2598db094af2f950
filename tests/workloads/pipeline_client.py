"""Moved to recipes/workloads/deserve_client.py (the DeServe recipes run it); this old path re-exports it."""

from __future__ import annotations

import sys

from recipes.workloads.deserve_client import ClientError, main, parse_workload, run

__all__ = ["ClientError", "main", "parse_workload", "run"]

if __name__ == "__main__":
    sys.exit(main())
