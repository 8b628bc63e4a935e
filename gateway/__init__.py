"""Touchpoint Gateway: the in-store edge gateway's core (no hardware imports here)."""

__version__ = "0.1.0"
