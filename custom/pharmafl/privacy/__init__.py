"""Differential privacy and privacy audits: accounting, DP-SGD, membership inference (no FLARE)."""
