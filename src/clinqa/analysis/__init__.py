"""Analyses of what adaptation changed: token-probability shifts of clinical terms."""
