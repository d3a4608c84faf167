"""Who a verified client certificate names: the rule both transports apply.

The transport hands in the certificate's URI SANs and subject common names, and only for a
certificate the handshake verified against the configured client CA (an unverified or absent
certificate gives no identity at all):

- a SPIFFE ID (``spiffe://trust-domain/path``) when the certificate has exactly one URI SAN of
  that scheme (the X.509-SVID rule); several SPIFFE URIs are ambiguous and give no identity;
- otherwise the subject CN, when there is exactly one, and it is not itself shaped like a SPIFFE
  ID (a CN is not where a SPIFFE ID is vouched for, so it cannot pose as one).

Which service account an identity stands for is the authentication stage's business.
"""

from __future__ import annotations

from collections.abc import Iterable

SPIFFE_SCHEME = "spiffe://"
#: Longest identity believed (SPIFFE IDs are at most 2048 bytes).
MAX_IDENTITY = 2048


def certificate_identity(uri_sans: Iterable[str], common_names: Iterable[str]) -> str | None:
    spiffe = [uri for uri in uri_sans if uri[: len(SPIFFE_SCHEME)].lower() == SPIFFE_SCHEME]
    if spiffe:
        return spiffe[0] if len(spiffe) == 1 and _sane(spiffe[0]) else None
    names = list(common_names)
    if len(names) != 1 or names[0].lower().startswith("spiffe:"):
        return None
    return names[0] if _sane(names[0]) else None


def _sane(identity: str) -> bool:
    """Not empty, not huge, no control characters or line breaks: it goes into logs and
    look-ups as is."""
    return 0 < len(identity) <= MAX_IDENTITY and identity.isprintable()
