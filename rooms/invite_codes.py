"""Short invite codes a village doctor can read out: issued beside an invite token, exchanged
for it later. Only an HMAC of a code is stored, so the table gives no code away; the code
lives as long as its invite and dies with the invite's revocation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import unicodedata
from datetime import datetime

from rooms.clock import Clock, utc_now
from rooms.errors import Conflict, Gone, InvalidInput, NotFound
from rooms.model import ConsultationId, UserId
from rooms.roles import Role
from rooms.store import InviteCode, RecordStore

# No look-alikes (0/O, 1/I/L, 2/Z, 5/S, 8/B, U/V): 23 symbols, 8 of them ~36 bits, which the
# guess limits of the redeeming endpoint make far too many to try.
ALPHABET = "34679ACDEFGHJKMNPQRTWXY"
LENGTH = 8
# What a person may type between the characters: spaces, hyphens, dots, underscores.
_SEPARATORS = frozenset(" -_.\u00b7\u2010\u2011\u2012\u2013\u2014\u3000")


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def grouped(code: str) -> str:
    """`K7QM2XRD` as `K7QM-2XRD`: two groups of four read out more easily."""
    half = LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def normalise(text: str) -> str:
    """The code a person typed: any case, full-width forms, separators anywhere."""
    folded = unicodedata.normalize("NFKC", text).upper()
    chars = [c for c in folded if c not in _SEPARATORS]
    wrong = sorted({c for c in chars if c not in ALPHABET})
    if wrong:
        shown = ", ".join(repr(c) for c in wrong[:5])
        raise InvalidInput(f"an invite code uses only the characters {ALPHABET}; not {shown}")
    if len(chars) != LENGTH:
        raise InvalidInput(f"an invite code has {LENGTH} characters, not {len(chars)}")
    return "".join(chars)


class InviteCodes:
    """Issues and redeems codes; `key` keys the HMAC (the same on every node)."""

    def __init__(self, store: RecordStore, key: bytes, clock: Clock = utc_now) -> None:
        self._store = store
        self._key = key
        self._now = clock

    def digest(self, code: str) -> str:
        return hmac.new(self._key, code.encode("ascii"), hashlib.sha256).hexdigest()

    async def issue(
        self,
        consultation_id: ConsultationId,
        jti: str,
        user_id: UserId,
        name: str,
        role: Role,
        org: str,
        expires_at: datetime,
    ) -> str:
        """A new code for an invite just issued; returns it grouped, for people to read."""
        now = self._now()
        for _ in range(3):
            code = new_code()
            row = InviteCode(
                self.digest(code), consultation_id, jti, user_id, name, role, org, expires_at, now
            )
            try:
                async with self._store.transaction() as tx:
                    # Expired codes go as new ones come: the rows hold names.
                    await tx.purge_invite_codes(now)
                    await tx.add_invite_code(row)
            except Conflict:
                continue  # the same code drawn twice: draw again
            return grouped(code)
        raise Conflict("could not draw an unused invite code; try again")

    async def redeem(self, text: str) -> InviteCode:
        """The invite a typed code stands for, while it is neither expired nor revoked."""
        wanted = self.digest(normalise(text))
        async with self._store.reading() as tx:
            found = await tx.get_invite_code(wanted)
            revoked = found is not None and await tx.is_token_revoked(found.jti)
        # The row was found by its hash; comparing again in constant time keeps a timing
        # difference in the lookup from telling how much of a hash matched.
        if found is None or not hmac.compare_digest(found.code_hash, wanted):
            raise NotFound("no invite has this code: check it, or ask for a new invitation")
        if found.expires_at <= self._now():
            raise Gone("this invite code has expired: ask for a new invitation")
        if revoked:
            raise Gone("this invitation was withdrawn: ask for a new one")
        return found
