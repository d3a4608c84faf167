"""Redis adapters of the fast-store ports: one transport, shared by the cache, the revocation
store and the rate limiter (imported only when ``REFERRAL_REDIS_URL`` is set)."""
