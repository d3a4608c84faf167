"""Adapters for outside HTTP services: Hunter (email verification) and profile enrichment
(Clearbit-compatible, People Data Labs). The domain layer sees them only through the
``EmailVerifier`` and ``ProfileProvider`` protocols."""
