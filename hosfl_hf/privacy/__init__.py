"""Privacy of the cut: the client-side defense ([`CutDefense`]) and the audit that plays the server
([`audit_privacy`]). See `docs/privacy.md`."""

from .audit import LinearInversion, PrivacyAudit, audit_privacy, cut_tokens, white_box_search
from .defense import CutDefense

__all__ = ["CutDefense", "LinearInversion", "PrivacyAudit", "audit_privacy", "cut_tokens", "white_box_search"]
