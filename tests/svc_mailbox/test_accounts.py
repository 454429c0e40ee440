"""Domains and accounts over real gRPC: creation and validation, listing with pages, lookups,
passwords (never stored in clear), authentication, recipient resolution, and who may call what."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from mailmesh.v1 import mailbox_service_pb2 as pb

from tests.svc_mailbox.conftest import Mesh, fresh_users
from tests.svc_mailbox.test_messages import append, expect, raw_message

pytestmark = pytest.mark.asyncio(loop_scope="module")

PW = "correct horse battery"


async def create_account(mesh: Mesh, email: str, password: str = PW, **kw: object) -> pb.CreateAccountResponse:
    return await mesh.stub.CreateAccount(pb.CreateAccountRequest(email=email, password=password, **kw),  # type: ignore[arg-type]
                                         metadata=mesh.md())


async def authenticate(mesh: Mesh, email: str, password: str) -> pb.AuthenticateResponse:
    return await mesh.stub.Authenticate(pb.AuthenticateRequest(email=email, password=password), metadata=mesh.md())


async def resolve(mesh: Mesh, address: str, size: int = 0) -> pb.ResolveRecipientResponse:
    return await mesh.stub.ResolveRecipient(pb.ResolveRecipientRequest(address=address, message_size=size),
                                            metadata=mesh.md())


@pytest.mark.asyncio(loop_scope="function")
async def test_domains_and_account_listing_pages(mesh: Mesh) -> None:
    names = [f"dom{i:02d}.test" for i in range(23)]
    await asyncio.gather(*(mesh.stub.CreateDomain(pb.CreateDomainRequest(name=n), metadata=mesh.md()) for n in names))
    r = await mesh.stub.CreateDomain(pb.CreateDomainRequest(name="  Example.ORG "), metadata=mesh.md())
    assert r.domain.name == "example.org" and r.domain.create_time.seconds > 0
    await expect(grpc.StatusCode.ALREADY_EXISTS, mesh.stub.CreateDomain(
        pb.CreateDomainRequest(name="EXAMPLE.org"), metadata=mesh.md()), "example.org")
    for bad in ("", "no spaces.test", "-bad-.test", "a" * 300 + ".test"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.CreateDomain(
            pb.CreateDomainRequest(name=bad), metadata=mesh.md()))

    listed: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await mesh.stub.ListDomains(pb.ListDomainsRequest(page_size=5, page_token=token), metadata=mesh.md())
        assert len(page.domains) <= 5
        listed += [d.name for d in page.domains]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted([*names, "example.org"]) and pages == 5
    everything = await mesh.stub.ListDomains(pb.ListDomainsRequest(page_size=5000), metadata=mesh.md())
    assert len(everything.domains) == 24 and not everything.next_page_token
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListDomains(
        pb.ListDomainsRequest(page_size=-1), metadata=mesh.md()), "page_size")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListDomains(
        pb.ListDomainsRequest(page_token="forged"), metadata=mesh.md()), "page_token")

    # accounts in two domains, listed by address, with a domain filter
    emails = [f"user{i:02d}@dom0{i % 2}.test" for i in range(12)]
    await asyncio.gather(*(create_account(mesh, e) for e in emails))
    token, got = "", []
    while True:
        page2 = await mesh.stub.ListAccounts(pb.ListAccountsRequest(page_size=5, page_token=token), metadata=mesh.md())
        got += [a.email for a in page2.accounts]
        token = page2.next_page_token
        if not token:
            break
    assert got == sorted(emails)
    token, in_dom1 = "", []
    while True:
        page2 = await mesh.stub.ListAccounts(pb.ListAccountsRequest(domain="DOM01.test", page_size=2, page_token=token),
                                             metadata=mesh.md())
        in_dom1 += [a.email for a in page2.accounts]
        token = page2.next_page_token
        if not token:
            break
    assert in_dom1 == sorted(e for e in emails if e.endswith("@dom01.test"))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListAccounts(
        pb.ListAccountsRequest(page_size=-3), metadata=mesh.md()), "page_size")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListAccounts(
        pb.ListAccountsRequest(domain="not a domain"), metadata=mesh.md()))
    assert len((await mesh.stub.ListAccounts(pb.ListAccountsRequest(page_size=10**6), metadata=mesh.md())).accounts) == 12
    # a token is bound to its listing
    first = await mesh.stub.ListAccounts(pb.ListAccountsRequest(page_size=2), metadata=mesh.md())
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListAccounts(
        pb.ListAccountsRequest(domain="dom01.test", page_token=first.next_page_token), metadata=mesh.md()),
        "page_token")
    assert (await mesh.stub.ListAccounts(pb.ListAccountsRequest(domain="dom22.test"), metadata=mesh.md())).accounts == []
    counts = {d.name: d.accounts_total for d in everything.domains}
    assert counts["dom00.test"] == 0  # listed before the accounts existed
    again = {d.name: d.accounts_total
             for d in (await mesh.stub.ListDomains(pb.ListDomainsRequest(), metadata=mesh.md())).domains}
    assert again["dom00.test"] == 6 and again["dom01.test"] == 6 and again["dom05.test"] == 0


async def test_create_account_validation(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    await mesh.stub.CreateDomain(pb.CreateDomainRequest(name="acct.test"), metadata=mesh.md())
    await mesh.stub.CreateDomain(pb.CreateDomainRequest(name="alias.test"), metadata=mesh.md())
    r = await create_account(mesh, "  Zoe@Acct.TEST ", display_name="Zoe Z", aliases=["zz@alias.test", "ZOE@acct.test"],
                             quota_bytes=5000)
    a = r.account
    assert a.email == "zoe@acct.test" and a.display_name == "Zoe Z" and a.quota_bytes == 5000
    assert list(a.addresses) == ["zoe@acct.test", "zz@alias.test"] and a.user_id and a.create_time.seconds
    default = (await create_account(mesh, "yan@acct.test")).account
    assert default.quota_bytes == mesh.settings.default_quota_bytes

    await expect(grpc.StatusCode.NOT_FOUND, create_account(mesh, "x@unknown.test"), "unknown.test")
    await expect(grpc.StatusCode.NOT_FOUND, create_account(mesh, "x@acct.test", aliases=["x@elsewhere.test"]),
                 "elsewhere.test")
    await expect(grpc.StatusCode.ALREADY_EXISTS, create_account(mesh, "ZOE@acct.test"), "zoe@acct.test")
    await expect(grpc.StatusCode.ALREADY_EXISTS, create_account(mesh, "zz@alias.test"), "zz@alias.test")
    await expect(grpc.StatusCode.ALREADY_EXISTS, create_account(mesh, "new@acct.test", aliases=["zz@alias.test"]))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, create_account(mesh, "short@acct.test", password="1234567"),
                 "at least 8")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, create_account(mesh, "long@acct.test", password="x" * 1025))
    for bad in ("", "no-at-sign", "a@@acct.test", "two words@acct.test"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, create_account(mesh, bad))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, create_account(mesh, "neg@acct.test", quota_bytes=-1), "quota")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, create_account(mesh, "dn@acct.test", display_name="d" * 201))
    # failed creations left nothing behind
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.GetAccount(pb.GetAccountRequest(email="new@acct.test"),
                                                                 metadata=mesh.md()))
    res = await resolve(mesh, "new@acct.test")
    assert res.resolution == pb.RECIPIENT_RESOLUTION_UNKNOWN_USER


async def test_get_account_by_name_and_email(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    u = await fresh_users(mesh)
    alice, bob = u["alice"], u["bob"]
    me = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    domain = me.email.split("@")[1]
    assert me.user_id == alice and me.email == f"alice@{domain}" and me.display_name == "Alice"
    by_id = (await mesh.stub.GetAccount(pb.GetAccountRequest(name=f"users/{alice}"), metadata=mesh.md())).account
    by_email = (await mesh.stub.GetAccount(pb.GetAccountRequest(email=f"ALICE@{domain.upper()}"),
                                           metadata=mesh.md())).account
    assert by_id.user_id == by_email.user_id == alice
    await append(mesh, alice, raw_message("x", "y" * 100))
    after = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    assert after.messages_total == 1 and after.used_bytes > 100 and after.highest_modseq >= 1
    own = (await mesh.stub.GetAccount(pb.GetAccountRequest(email=f"bob@{domain}"), metadata=mesh.md(bob))).account
    assert own.user_id == bob
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.GetAccount(pb.GetAccountRequest(email=f"nobody@{domain}"),
                                                                 metadata=mesh.md()))
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.GetAccount(pb.GetAccountRequest(name="users/nobody"),
                                                                 metadata=mesh.md()))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.GetAccount(
        pb.GetAccountRequest(name=f"users/{alice}", email=f"alice@{domain}"), metadata=mesh.md()), "not both")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.GetAccount(pb.GetAccountRequest(), metadata=mesh.md()))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"),
                                                                        metadata=mesh.md()), "acting user")
    await expect(grpc.StatusCode.PERMISSION_DENIED, mesh.stub.GetAccount(
        pb.GetAccountRequest(name=f"users/{alice}"), metadata=mesh.md(bob)))


async def test_passwords_authenticate_and_are_never_stored_in_clear(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    u = await fresh_users(mesh)
    alice, bob = u["alice"], u["bob"]
    email = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account.email
    domain = email.split("@")[1]
    ok = await authenticate(mesh, email, PW)
    assert ok.account.user_id == alice
    assert (await authenticate(mesh, email.upper(), PW)).account.user_id == alice
    wrong = await expect(grpc.StatusCode.UNAUTHENTICATED, authenticate(mesh, email, PW + "!"))
    unknown = await expect(grpc.StatusCode.UNAUTHENTICATED, authenticate(mesh, f"nobody@{domain}", PW))
    foreign = await expect(grpc.StatusCode.UNAUTHENTICATED, authenticate(mesh, "alice@elsewhere.test", PW))
    garbage = await expect(grpc.StatusCode.UNAUTHENTICATED, authenticate(mesh, "not an address", PW))
    # the same answer whether or not the account exists
    assert wrong.details() == unknown.details() == foreign.details() == garbage.details()
    await expect(grpc.StatusCode.UNAUTHENTICATED, authenticate(mesh, email, ""))

    secret = "Secret-Pass-Phrase-4711"
    await mesh.stub.SetPassword(pb.SetPasswordRequest(name="users/me", password=secret), metadata=mesh.md(alice))
    await expect(grpc.StatusCode.UNAUTHENTICATED, authenticate(mesh, email, PW))
    assert (await authenticate(mesh, email, secret)).account.user_id == alice
    await mesh.stub.SetPassword(pb.SetPasswordRequest(name=f"users/{bob}", password=secret + "b"), metadata=mesh.md())
    assert (await authenticate(mesh, f"bob@{domain}", secret + "b")).account.user_id == bob
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.SetPassword(
        pb.SetPasswordRequest(name="users/me", password="short"), metadata=mesh.md(alice)), "at least 8")
    await expect(grpc.StatusCode.PERMISSION_DENIED, mesh.stub.SetPassword(
        pb.SetPasswordRequest(name=f"users/{alice}", password="bob was here"), metadata=mesh.md(bob)))
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.SetPassword(
        pb.SetPasswordRequest(name="users/nobody", password="whatever123"), metadata=mesh.md()))
    assert (await authenticate(mesh, email, secret)).account.user_id == alice

    db = Path(mesh.settings.resolved_kv_path())
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # the db, its WAL
    for pw in (secret.encode(), PW.encode(), (secret + "b").encode()):
        assert pw not in stored
        assert pw.decode().encode("utf-16-le") not in stored


async def test_resolve_recipient(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    await mesh.stub.CreateDomain(pb.CreateDomainRequest(name="resolve.test"), metadata=mesh.md())
    acct = (await create_account(mesh, "rita@resolve.test", aliases=["r.alias@resolve.test"],
                                 quota_bytes=2000)).account
    user = acct.user_id

    r = await resolve(mesh, "rita@resolve.test")
    assert (r.resolution, r.user_id, r.canonical_address) == (pb.RECIPIENT_RESOLUTION_LOCAL_USER, user,
                                                              "rita@resolve.test")
    r = await resolve(mesh, "<RITA@Resolve.Test>")
    assert r.resolution == pb.RECIPIENT_RESOLUTION_LOCAL_USER and r.canonical_address == "rita@resolve.test"
    assert (await resolve(mesh, "r.alias@resolve.test")).user_id == user
    sub = await resolve(mesh, "rita+newsletters@resolve.test")
    assert sub.resolution == pb.RECIPIENT_RESOLUTION_LOCAL_USER and sub.user_id == user
    r = await resolve(mesh, "nobody@resolve.test")
    assert r.resolution == pb.RECIPIENT_RESOLUTION_UNKNOWN_USER and not r.user_id
    assert (await resolve(mesh, "nobody+x@resolve.test")).resolution == pb.RECIPIENT_RESOLUTION_UNKNOWN_USER
    r = await resolve(mesh, "rita@elsewhere.test")
    assert r.resolution == pb.RECIPIENT_RESOLUTION_FOREIGN_DOMAIN and not r.user_id
    r = await resolve(mesh, "rita@resolve.test", size=2001)
    assert (r.resolution, r.user_id) == (pb.RECIPIENT_RESOLUTION_OVER_QUOTA, user)
    assert (await resolve(mesh, "rita@resolve.test", size=2000)).resolution == pb.RECIPIENT_RESOLUTION_LOCAL_USER
    await append(mesh, user, raw_message("fill", "f" * 1000))
    assert (await resolve(mesh, "rita@resolve.test", size=1500)).resolution == pb.RECIPIENT_RESOLUTION_OVER_QUOTA
    assert (await resolve(mesh, "rita@resolve.test", size=100)).resolution == pb.RECIPIENT_RESOLUTION_LOCAL_USER
    for bad in ("", "not-an-address", "a@b@c", "x" * 600 + "@resolve.test"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, resolve(mesh, bad))


async def test_full_mailbox_is_over_quota_for_unknown_sizes(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    await mesh.stub.CreateDomain(pb.CreateDomainRequest(name="full.test"), metadata=mesh.md())
    raw = raw_message("exact", "e" * 500)
    user = (await create_account(mesh, "fred@full.test", quota_bytes=len(raw))).account.user_id
    assert (await resolve(mesh, "fred@full.test")).resolution == pb.RECIPIENT_RESOLUTION_LOCAL_USER
    await append(mesh, user, raw)
    assert (await resolve(mesh, "fred@full.test")).resolution == pb.RECIPIENT_RESOLUTION_OVER_QUOTA


async def test_who_may_call_what(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    s = mesh.stub
    as_user = mesh.md(alice)
    denied = grpc.StatusCode.PERMISSION_DENIED
    for call in (
        s.CreateDomain(pb.CreateDomainRequest(name="evil.test"), metadata=as_user),
        s.ListDomains(pb.ListDomainsRequest(), metadata=as_user),
        s.CreateAccount(pb.CreateAccountRequest(email="evil@evil.test", password=PW), metadata=as_user),
        s.ListAccounts(pb.ListAccountsRequest(), metadata=as_user),
        s.Authenticate(pb.AuthenticateRequest(email="a@b.test", password=PW), metadata=as_user),
        s.ResolveRecipient(pb.ResolveRecipientRequest(address="a@b.test"), metadata=as_user),
        s.DeliverMessage(pb.DeliverMessageRequest(parent=f"users/{alice}", ingest_id="x", blob_ref="0" * 64),
                         metadata=as_user),
        s.UpdateDeliveryStatus(pb.UpdateDeliveryStatusRequest(name=f"users/{alice}/messages/x"), metadata=as_user),
    ):
        await expect(denied, call, "administrative")
    unauth = grpc.StatusCode.UNAUTHENTICATED
    for md in ((), (("x-mailmesh-user", alice),), mesh.md(token="wrong"), mesh.md(alice, token="wrong"),
               mesh.md(token="")):
        await expect(unauth, s.ListDomains(pb.ListDomainsRequest(), metadata=md), "token")
        await expect(unauth, s.ListLabels(pb.ListLabelsRequest(parent="users/me"), metadata=md), "token")

        async def stream(md: tuple[tuple[str, str], ...] = md) -> None:
            async for _ in s.WatchChanges(pb.WatchChangesRequest(parent="users/me"), metadata=md):
                break

        await expect(unauth, stream(), "token")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, s.ListLabels(pb.ListLabelsRequest(parent="users/me"),
                                                               metadata=mesh.md()), "acting user")
