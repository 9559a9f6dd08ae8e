"""Whose jobs a caller may see: a job belongs to the API key that made it.

Why the key decides: the key is the only identity the gateway knows, and a backend team gets one key;
with keys on, bob must not list alice's prompts, fetch her video, cancel her job or learn her parameters
from a cache hit. A job another key made answers NOT_FOUND / 404, exactly like an id that does not
exist, so ids cannot be probed. An admin key (``--admin-keys-file``, ``T2V_ADMIN_API_KEYS``) sees and
cancels every job: what operators use (``t2v jobs list --api-key ADMIN``). With keys off there is one
namespace, as before.

Why a digest and not the key: the store (shared by gateways, backed up, read by operators) must never
hold a key. The digest is keyed by a fixed label, so it is not the plain SHA-256 of the key either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from services.common.auth import key_matches

TENANT_LABEL = b"t2v-mesh tenant v1\x00"


def tenant_of(key: str) -> str:
    """The tenant a key's jobs are stored under: 32 hex characters, the same on every gateway."""
    return hashlib.sha256(TENANT_LABEL + key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Caller:
    """Who makes a call: ``tenant`` "" when keys are off (one namespace), ``admin`` for an admin key."""

    tenant: str = ""
    admin: bool = False

    def sees(self, tenant: str) -> bool:
        """May this caller see (get, watch, fetch, cancel) a job of ``tenant``?"""
        return self.admin or not self.tenant or tenant == self.tenant

    @property
    def scope(self) -> str | None:
        """The tenant a listing keeps to; None = every job."""
        return None if self.admin or not self.tenant else self.tenant


EVERYONE = Caller()            # keys off, or the gateway itself (recovery, housekeeping)


class Tenancy:
    """Maps the key a call presented (already checked by the front door) to its Caller."""

    def __init__(self, keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> None:
        self._admin = [key.encode() for key in admin_keys]
        self.enabled = bool(self._admin) or any(True for _ in keys)

    def caller(self, key: str | None) -> Caller:
        if not self.enabled:
            return EVERYONE
        if key is None:            # the front door lets no keyless call through with keys on; never "everyone"
            return Caller(tenant="-")
        return Caller(tenant=tenant_of(key), admin=key_matches(self._admin, key))
