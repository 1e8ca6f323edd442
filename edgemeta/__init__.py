"""edgemeta: continual few-shot adaptation of a meta-learned model on edge devices."""

from __future__ import annotations

__version__ = "0.1.0"
