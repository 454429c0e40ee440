"""svc_mailbox with its raw messages in an S3-compatible bucket (MAILMESH_BLOB_URL): the real
service over gRPC, the real S3 driver, a real S3 API server on loopback (tests/s3server.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common.blobstore import open_blobstore
from mailmesh_common.errors import Unavailable
from tests.s3server import aws_env, make_bucket, s3_client, s3_endpoint  # noqa: F401
from tests.svc_mailbox.conftest import start_mesh, stop_mesh
from tests.svc_mailbox.test_messages import append, expect, get_message, raw_message

pytest.importorskip("boto3", reason="boto3 is not installed")
F = types_pb2.MessageFormat


def _keys(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


async def test_messages_live_in_the_bucket_and_are_collected_from_it(
        tmp_path: Path, nats_url: str, s3_endpoint: str, aws_env: None) -> None:  # noqa: F811
    bucket = make_bucket(s3_endpoint)
    mesh = await start_mesh(tmp_path, nats_url, blob_url=f"s3://{bucket}/mail", s3_endpoint_url=s3_endpoint)
    try:
        alice = (await mesh.admin_setup())["alice"]
        raw = raw_message("on s3", f"body {os.urandom(8).hex()}")
        m = await append(mesh, alice, raw)
        ref = hashlib.sha256(raw).hexdigest()
        assert m.blob_ref == ref
        assert _keys(s3_endpoint, bucket) == [f"mail/{ref[:2]}/{ref[2:4]}/{ref}"]
        assert not (tmp_path / "data" / "blobs").exists(), "nothing goes to local files"
        got = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_RAW)
        assert got.raw == raw
        full = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_FULL)
        assert full.subject == "on s3"

        # ingest's path: the blob is stored first, then delivered by reference
        store = open_blobstore(mesh.settings)
        raw2 = raw_message("delivered", "by reference")
        ref2 = await store.put(raw2)
        r = await mesh.stub.DeliverMessage(pb.DeliverMessageRequest(
            parent=f"users/{alice}", ingest_id="ing-s3-1", blob_ref=ref2), metadata=mesh.md())
        assert (await get_message(mesh, alice, r.message.id, F.MESSAGE_FORMAT_RAW)).raw == raw2

        await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{m.id}"),
                                      metadata=mesh.md(alice))
        mailbox = mesh.ctx.components["mailbox"]
        await mailbox.collect_blobs(grace_s=3600)
        assert await store.exists(ref), "kept for the grace period"
        await mailbox.collect_blobs(grace_s=0)
        assert not await store.exists(ref)
        assert await store.exists(ref2), "still referenced"
    finally:
        await stop_mesh(mesh)


async def test_bucket_gone_is_a_temporary_failure_not_a_crash(
        tmp_path: Path, nats_url: str, s3_endpoint: str, aws_env: None) -> None:  # noqa: F811
    bucket = make_bucket(s3_endpoint)
    mesh = await start_mesh(tmp_path, nats_url, blob_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint)
    try:
        alice = (await mesh.admin_setup())["alice"]
        m = await append(mesh, alice, raw_message("kept"))
        c = s3_client(s3_endpoint)
        for v in c.list_object_versions(Bucket=bucket).get("Versions", []):
            c.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        c.delete_bucket(Bucket=bucket)
        await expect(grpc.StatusCode.UNAVAILABLE, append(mesh, alice, raw_message("new")))
        # metadata reads still work; the raw body is reported unavailable, not a crash
        assert (await get_message(mesh, alice, m.id)).subject == "kept"
        err = await expect(grpc.StatusCode.UNAVAILABLE, get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_RAW))
        assert s3_endpoint not in (err.details() or "")
    finally:
        await stop_mesh(mesh)


async def test_unversioned_bucket_refused_at_start(
        tmp_path: Path, nats_url: str, s3_endpoint: str, aws_env: None) -> None:  # noqa: F811
    bucket = make_bucket(s3_endpoint, versioned=False)
    with pytest.raises(Unavailable, match="versioning"):
        await start_mesh(tmp_path, nats_url, blob_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint)
