"""Adapters for the domain's crypto ports: argon2id password hashing, JWT access and refresh
tokens."""
