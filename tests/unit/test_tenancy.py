"""Who sees which job (services/gateway/tenancy.py): pure logic."""

from __future__ import annotations

from services.gateway.tenancy import EVERYONE, Caller, Tenancy, tenant_of


def test_keys_off_is_one_namespace() -> None:
    tenancy = Tenancy()
    assert tenancy.caller(None) is EVERYONE and tenancy.caller("any-key") is EVERYONE
    assert EVERYONE.sees("") and EVERYONE.sees(tenant_of("k")) and EVERYONE.scope is None


def test_a_key_sees_only_its_own_tenant_and_an_admin_sees_all() -> None:
    tenancy = Tenancy(keys={"alice", "bob"}, admin_keys={"root"})
    alice, bob, root = tenancy.caller("alice"), tenancy.caller("bob"), tenancy.caller("root")
    assert alice.tenant == tenant_of("alice") != bob.tenant
    assert alice.sees(alice.tenant) and not alice.sees(bob.tenant) and not alice.sees("")
    assert alice.scope == alice.tenant
    assert root.admin and root.scope is None and root.sees(alice.tenant) and root.sees("")
    assert not alice.admin and not bob.admin


def test_a_keyless_call_with_keys_on_sees_nothing_of_anyone() -> None:
    nobody = Tenancy(keys={"alice"}).caller(None)
    assert not nobody.admin and not nobody.sees(tenant_of("alice")) and not nobody.sees("")


def test_the_tenant_is_a_stable_digest_never_the_key() -> None:
    digest = tenant_of("k-1234")
    assert digest == tenant_of("k-1234") and len(digest) == 32 and "k-1234" not in digest
    assert Caller(tenant=digest).sees(digest)
