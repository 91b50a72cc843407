"""Operator actions shared by the admin HTTP routes and the CLI (one implementation each)."""
