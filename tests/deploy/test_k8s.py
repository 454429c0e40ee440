"""The Kubernetes manifests (k8s/) and the image (Dockerfile) agree with the code: every setting
they pass is one mailmesh accepts, every probe and Service points at a port the container
serves, every command names a service module, every kustomization lists files that exist.
(No cluster here: this is what can be checked without one.)"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailmesh_common.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SERVICES = {"mailbox": "mailbox_port", "ingest": "ingest_port", "search": "search_port",
            "send": "send_port", "gateway": "gateway_port"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomizations() -> Iterator[Path]:
    yield from sorted(K8S.rglob("kustomization.yaml"))


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for kust in _kustomizations():
        for res in _docs(kust)[0].get("resources", []):
            target = kust.parent / res
            if target.is_file():
                out += [(target, d) for d in _docs(target)]
    return out


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _all_docs() if d.get("kind") == kind]


def _configmap(name: str) -> dict[str, str]:
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == name]
    return dict(cm["data"])


def _secret_keys() -> set[str]:
    example = (K8S / "base" / "secrets.env.example").read_text()
    return {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}


def test_every_kustomization_resource_exists() -> None:
    for kust in _kustomizations():
        doc = _docs(kust)[0]
        for res in doc.get("resources", []):
            assert (kust.parent / res).exists(), f"{kust}: resource {res} missing"
    top = _docs(K8S / "kustomization.yaml")[0]
    assert set(top["resources"]) == {p.name for p in K8S.iterdir() if p.is_dir()}


def test_secrets_are_generated_from_an_ignored_file() -> None:
    base = _docs(K8S / "base" / "kustomization.yaml")[0]
    (gen,) = base["secretGenerator"]
    assert gen["envs"] == ["secrets.env"]
    assert "k8s/base/secrets.env" in (ROOT / ".gitignore").read_text()
    assert _secret_keys() == {"MAILMESH_INTERNAL_TOKEN", "MAILMESH_MEILI_API_KEY",
                              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def _containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for dep in _by_kind("Deployment"):
        if dep["metadata"]["labels"].get("app.kubernetes.io/name") in SERVICES:
            for c in dep["spec"]["template"]["spec"]["containers"]:
                yield dep["metadata"]["name"], dep, c


def test_every_service_setting_is_one_mailmesh_accepts() -> None:
    """The shared ConfigMap plus each Deployment's env must load as Settings (a typo'd key or a
    bad value would crash-loop the pods with ConfigError)."""
    shared = {k: v for k, v in _configmap("mailmesh-config").items() if k.startswith("MAILMESH_")}
    seen = set()
    for name, _, c in _containers():
        env = dict(shared)
        env.update({"MAILMESH_INTERNAL_TOKEN": "t", "MAILMESH_MEILI_API_KEY": "k"})
        for e in c.get("env", []):
            if e["name"].startswith("MAILMESH_"):
                env[e["name"]] = e["value"]
        s = load_settings(env=env)  # raises ConfigError on any unknown key or bad value
        assert str(s.host) == "0.0.0.0", name
        assert s.stream_replicas == 3
        assert s.blob_url.startswith("s3://"), "pods share raw messages through the object store"
        seen.add(name)
    assert seen == set(SERVICES)


def test_commands_ports_and_probes_match_the_code() -> None:
    defaults = load_settings(env={})
    for name, dep, c in _containers():
        module = c["command"][-1]
        assert c["command"][:2] == ["python", "-m"] and module == f"svc_{name}", name
        assert importlib.util.find_spec(module) is not None, module
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == getattr(defaults, SERVICES[name]), name
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], f"{name} {probe}"
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert mounts <= volumes, name
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    smtp = {c["name"]: {p["name"]: p["containerPort"] for p in c["ports"]} for _, _, c in _containers()}
    assert smtp["ingest"]["smtp"] == defaults.smtp_port
    assert smtp["send"]["submission"] == defaults.submission_port
    assert smtp["gateway"]["http"] == defaults.http_port


def test_services_route_to_declared_ports() -> None:
    pods: dict[str, dict[str, int]] = {}
    for kind in ("Deployment", "StatefulSet"):
        for d in _by_kind(kind):
            label = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for c in d["spec"]["template"]["spec"]["containers"]:
                pods.setdefault(label, {}).update({p["name"]: p["containerPort"] for p in c["ports"]})
    services = {}
    for svc in _by_kind("Service"):
        target = svc["spec"]["selector"]["app.kubernetes.io/name"]
        assert target in pods, svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in pods[target], f"{svc['metadata']['name']}: {p['targetPort']}"
        services[svc["metadata"]["name"]] = {p["port"] for p in svc["spec"]["ports"]}
    # every address in the shared config names a Service port
    cfg = _configmap("mailmesh-config")
    addrs = [cfg[k] for k in ("MAILMESH_MAILBOX_ADDR", "MAILMESH_SEARCH_ADDR", "MAILMESH_SEND_ADDR")]
    addrs += [re.sub(r"^\w+://", "", u) for u in (cfg["MAILMESH_NATS_URL"], cfg["OTEL_EXPORTER_OTLP_ENDPOINT"])]
    addrs += [re.sub(r"^\w+://", "", u) for u in cfg["MAILMESH_MEILI_URL"].split(",")]
    addrs.append(cfg["MAILMESH_CLAMD_ADDRESS"])
    for addr in addrs:
        host, port = addr.rsplit(":", 1)
        svc_name = host.split(".")[-1]  # pod-0.headless → headless
        assert int(port) in services.get(svc_name, set()), addr


def test_statefulset_storage_and_nats_durability() -> None:
    nats = _configmap("nats-config")["nats.conf"]
    assert "sync_interval: always" in nats
    (sts,) = [s for s in _by_kind("StatefulSet") if s["metadata"]["name"] == "nats"]
    assert sts["spec"]["replicas"] == 3
    assert nats.count("nats://nats-") == sts["spec"]["replicas"]
    meili = [s for s in _by_kind("StatefulSet") if s["metadata"]["name"] == "meilisearch"][0]
    urls = _configmap("mailmesh-config")["MAILMESH_MEILI_URL"].split(",")
    assert len(urls) == meili["spec"]["replicas"]


def test_fdb_cluster_file_comes_from_the_operator() -> None:
    (cluster,) = _by_kind("FoundationDBCluster")
    cm_name = f"{cluster['metadata']['name']}-config"
    fdb_users = 0
    for _, dep, _c in _containers():
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        if "fdb-operator" in vols:
            fdb_users += 1
            assert vols["fdb-operator"]["configMap"]["name"] == cm_name
    assert fdb_users == 4  # everything with a KV: mailbox, ingest, send, gateway
    docker = (ROOT / "Dockerfile").read_text()
    m = re.search(r"ARG FDB_VERSION=(\S+)", docker)
    assert m and m.group(1) == cluster["spec"]["version"]


def test_dockerfile_copies_every_packaged_module() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"packages = \[(.*?)\]", pyproject)
    assert m
    for pkg in re.findall(r'"([^"]+)"', m.group(1)):
        top = pkg.split("/")[0]
        assert re.search(rf"^COPY {re.escape(top)} ", docker, re.M), f"Dockerfile misses {top}"
        assert (ROOT / top).is_dir()


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in K8S.rglob("*.yaml")))
def test_yaml_parses(path: str) -> None:
    assert _docs(ROOT / path)
