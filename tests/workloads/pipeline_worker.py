"""Moved to recipes/workloads/deserve_worker.py (the DeServe recipes run it); this old path re-exports it."""

from __future__ import annotations

import sys

from recipes.workloads.deserve_worker import MODEL_LAYERS, STOP_TOKEN, VOCAB, layer_names, main, name_to_id

__all__ = ["MODEL_LAYERS", "STOP_TOKEN", "VOCAB", "layer_names", "main", "name_to_id"]

if __name__ == "__main__":
    sys.exit(main())
