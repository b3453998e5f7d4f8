"""Image fetching (funnel_hpc.worker.images): references, pulls from the real registries of
scripts/setup/45-registry.sh (marker `registry`), and a fake registry that counts requests
and misbehaves (corrupt blobs, 503s, Bearer tokens, redirects); HTTP redirects, keep-alive
and proxies; hostile layers against unpack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from funnel_hpc.worker.images import ImageError, ensure_rootfs, env_from_config, resolve
from funnel_hpc.worker.images.unpack import unpack_layers
from tests.components import need, needs
from tests.image_helpers import (
    ANONYMOUS,
    AUTHENTICATED,
    CA_FILE,
    OCI_INDEX,
    PASSWORD,
    USERNAME,
    ConnectProxy,
    FakeRegistry,
    digest_of,
    image_config,
    layer,
    registry_answers,
)
from tests.server_helpers import free_port

HEX = "a" * 64


@pytest.fixture
def fake():
    registry = FakeRegistry()
    yield registry
    registry.close()


@pytest.fixture
def real():
    """Settings for the two real registries (skips, or fails on CI, when they are not up)."""
    for host in (ANONYMOUS, AUTHENTICATED):
        if not registry_answers(host) or not CA_FILE.exists():
            need(f"the registry {host}", False, "not running or no test CA "
                 "(scripts/setup/45-registry.sh)")
    return {ANONYMOUS: {"ca_file": str(CA_FILE)},
            AUTHENTICATED: {"ca_file": str(CA_FILE), "username": USERNAME, "password": PASSWORD}}


# --- references ----------------------------------------------------------------------------

@pytest.mark.parametrize("image, registry, repository, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
    ("user/repo", "docker.io", "user/repo", "latest", None),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("index.docker.io/user/repo:t", "docker.io", "user/repo", "t", None),
    ("127.0.0.1:5055/library/busybox:latest", "127.0.0.1:5055", "library/busybox", "latest", None),
    ("host:5000/a/b/c", "host:5000", "a/b/c", "latest", None),
    ("localhost/name", "localhost", "name", "latest", None),
    ("quay.io/biocontainers/samtools:1.9--h91753b0_8", "quay.io", "biocontainers/samtools",
     "1.9--h91753b0_8", None),
    (f"name@sha256:{HEX}", "docker.io", "library/name", None, f"sha256:{HEX}"),
    (f"name:tag@sha256:{HEX}", "docker.io", "library/name", "tag", f"sha256:{HEX}"),
    (f"ghcr.io/o/r:v1@sha256:{HEX}", "ghcr.io", "o/r", "v1", f"sha256:{HEX}"),
    ("a__b/c-d.e", "docker.io", "a__b/c-d.e", "latest", None),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
])
def test_references_parse_like_docker(image, registry, repository, tag, digest):
    ref = resolve(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry, repository, tag, digest)
    assert resolve(ref.canonical()) == ref


def test_docker_hub_is_served_by_registry_1():
    assert resolve("alpine").api_host == "registry-1.docker.io"
    assert resolve("alpine").canonical() == "docker.io/library/alpine:latest"
    assert resolve("127.0.0.1:5055/x").api_host == "127.0.0.1:5055"


@pytest.mark.parametrize("image", [
    "", " alpine", "alpine\n", "Alpine", "user/Repo", "alpine:", "alpine:-x", "alpine:a/b",
    "name@sha256:abc", f"name@sha512:{HEX}", f"name@sha256:{HEX.upper()}", "a//b", "/abs",
    "a/../b", "a/./b", "host:port/x", "x" * 300, "a..b", "-a", "a-", "a:b:c",
    "bad_host.io:99999999/x", "alpine:" + "t" * 129,
])
def test_bad_references_are_invalid(image):
    with pytest.raises(ImageError) as caught:
        resolve(image)
    assert caught.value.reason == "invalid"


# --- the real registries -------------------------------------------------------------------

@pytest.mark.registry
def test_busybox_pulls_into_a_complete_root(real, tmp_path):
    root = ensure_rootfs(f"{ANONYMOUS}/library/busybox:latest", tmp_path, real)
    busybox = root.rootfs / "bin" / "busybox"
    assert busybox.is_file() and os.access(busybox, os.X_OK)
    assert os.readlink(root.rootfs / "bin" / "sh") == "busybox"
    assert (root.rootfs / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert (root.rootfs / "bin" / "vi").is_symlink()
    assert root.config["Cmd"] == ["sh"]
    assert root.reference == f"{ANONYMOUS}/library/busybox:latest"
    assert root.digest.startswith("sha256:") and root.digest == root.manifest_digest
    assert not (root.rootfs.stat().st_mode & 0o022), "group/other must not write the image"


@pytest.mark.registry
def test_testimage_userland_and_config(real, tmp_path):
    root = ensure_rootfs(f"{ANONYMOUS}/funnel/testimage:1", tmp_path, real)
    assert "ID=funnel-test" in (root.rootfs / "etc" / "os-release").read_text()
    assert (root.rootfs / "opt" / "funnel-test" / "marker").is_file()
    assert os.access(root.rootfs / "opt" / "funnel-test" / "bin" / "funnel-hello", os.X_OK)
    assert not (root.rootfs / "bin" / "vi").exists(), "the second layer's whiteout"
    assert root.config["WorkingDir"] == "/opt/funnel-test"
    assert env_from_config(root.config) == {"PATH": "/opt/funnel-test/bin:/bin",
                                            "FUNNEL_IMAGE": "testimage"}


@pytest.mark.registry
def test_docker_media_types_pull(real, tmp_path):
    root = ensure_rootfs(f"{ANONYMOUS}/library/busybox:v2s2", tmp_path, real)
    assert (root.rootfs / "bin" / "busybox").is_file()


@pytest.mark.registry
def test_pinned_digest_pull_and_a_wrong_digest(real, tmp_path):
    first = ensure_rootfs(f"{ANONYMOUS}/funnel/testimage:1", tmp_path / "a", real)
    pinned = ensure_rootfs(f"{ANONYMOUS}/funnel/testimage@{first.digest}", tmp_path / "b", real)
    assert pinned.digest == first.digest
    assert (pinned.rootfs / "opt" / "funnel-test" / "marker").is_file()
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{ANONYMOUS}/funnel/testimage@sha256:{HEX}", tmp_path / "c", real,
                      retry_seconds=5)
    assert caught.value.reason == "not_found"


@pytest.mark.registry
def test_basic_auth_registry(real, tmp_path):
    root = ensure_rootfs(f"{AUTHENTICATED}/funnel/testimage:1", tmp_path / "ok", real)
    assert (root.rootfs / "opt" / "funnel-test" / "marker").is_file()
    wrong = {AUTHENTICATED: {**real[AUTHENTICATED], "password": "not-the-password"}}
    for settings in (wrong, {AUTHENTICATED: {"ca_file": str(CA_FILE)}}):
        with pytest.raises(ImageError) as caught:
            ensure_rootfs(f"{AUTHENTICATED}/funnel/testimage:1", tmp_path / "no", settings)
        assert caught.value.reason == "auth"
        assert "authentication failed" in str(caught.value)
        assert "not-the-password" not in str(caught.value)


@pytest.mark.registry
def test_missing_image_is_not_found(real, tmp_path):
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{ANONYMOUS}/library/nope:latest", tmp_path, real)
    assert caught.value.reason == "not_found"
    assert str(caught.value).startswith(f"image {ANONYMOUS}/library/nope:latest: not found")
    assert "registry said: " in str(caught.value)


@pytest.mark.registry
def test_an_unknown_certificate_is_refused(real, tmp_path):
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{ANONYMOUS}/library/busybox:latest", tmp_path, {}, retry_seconds=60)
    assert caught.value.reason == "unreachable"
    assert "TLS failed: certificate verify failed" in str(caught.value)
    assert "ca_file" in str(caught.value)  # the hint at the fix


def test_unreachable_registry_gives_up_after_retry_seconds(tmp_path):
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{host}/x/y:1", tmp_path, {host: {"insecure": True}}, retry_seconds=1)
    assert caught.value.reason == "unreachable"
    assert "unreachable after 1 s: ConnectionError" in str(caught.value)
    assert time.monotonic() - started < 30  # bounded by retry_seconds, not hanging


# --- the fake registry ---------------------------------------------------------------------

def small_image(fake: FakeRegistry, repository: str = "t/app", tag: str = "1") -> str:
    return fake.add_image(repository, tag, [
        layer(("bin/tool", "file", "#!/bin/sh\necho tool\n", 0o755), ("etc/conf", "file", "a=1")),
        layer(("data/big", "file", os.urandom(1 << 20)))],
        image_config(["PATH=/bin", "A=1"], "/data"))


def test_warm_start_makes_no_request_and_pull_always_asks_once(fake, tmp_path):
    small_image(fake)
    image = f"{fake.host}/t/app:1"
    first = ensure_rootfs(image, tmp_path, fake.settings)
    requests_made = sum(fake.gets.values())
    again = ensure_rootfs(image, tmp_path, fake.settings)
    assert sum(fake.gets.values()) == requests_made
    assert again.rootfs == first.rootfs and again.config == first.config
    ensure_rootfs(image, tmp_path, fake.settings, pull="always")
    assert sum(fake.gets.values()) == requests_made + 1  # the manifest only
    ensure_rootfs(image, tmp_path, fake.settings, tag_ttl=0)
    assert sum(fake.gets.values()) == requests_made + 2


def test_a_blob_that_does_not_match_its_digest_is_refused(fake, tmp_path):
    small_image(fake)
    manifest = json.loads(fake.manifests[("t/app", "1")][0])
    fake.corrupt.add(manifest["layers"][0]["digest"])
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, fake.settings)
    assert caught.value.reason == "digest"
    assert f"digest mismatch for blob {manifest['layers'][0]['digest']}" in str(caught.value)
    assert not (tmp_path / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).exists()
    assert not list((tmp_path / "images").glob("*"))


def test_a_corrupted_cached_blob_is_fetched_again(fake, tmp_path):
    shared = layer(("lib/shared", "file", "shared bytes " * 100))
    fake.add_image("t/one", "1", [shared])
    fake.add_image("t/two", "1", [shared, layer(("two", "file", "2"))])
    ensure_rootfs(f"{fake.host}/t/one:1", tmp_path, fake.settings)
    blob = tmp_path / "blobs" / "sha256" / digest_of(shared)[7:]
    blob.write_bytes(bytes([blob.read_bytes()[0] ^ 1]) + blob.read_bytes()[1:])  # same size
    root = ensure_rootfs(f"{fake.host}/t/two:1", tmp_path, fake.settings)
    assert (root.rootfs / "lib" / "shared").read_text() == "shared bytes " * 100
    assert fake.blob_gets()[digest_of(shared)] == 2


def test_a_manifest_that_does_not_match_the_pinned_digest(fake, tmp_path):
    digest = small_image(fake)
    raw, media_type = fake.manifests[("t/app", digest)]
    fake.manifests[("t/app", digest)] = (raw + b" ", media_type)
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/app@{digest}", tmp_path, fake.settings)
    assert caught.value.reason == "digest"


def test_an_index_gives_this_platforms_manifest(fake, tmp_path):
    from funnel_hpc.worker.images import platform
    arch, variant = platform()
    other = fake.add_image("t/multi", "other", [layer(("which", "file", "other"))])
    mine = fake.add_image("t/multi", "mine", [layer(("which", "file", "mine"))])
    entries = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                "size": len(fake.manifests[("t/multi", digest)][0]),
                "platform": {"os": "linux", "architecture": name, **(
                    {"variant": variant} if variant and name == arch else {})}}
               for digest, name in ((other, "s390x" if arch != "s390x" else "amd64"),
                                    (mine, arch))]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    index_digest = fake.add_manifest("t/multi", "1", index, OCI_INDEX)
    root = ensure_rootfs(f"{fake.host}/t/multi:1", tmp_path, fake.settings)
    assert (root.rootfs / "which").read_text() == "mine"
    assert (root.digest, root.manifest_digest) == (index_digest, mine)
    windows = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**entries[1], "platform": {"os": "windows", "architecture": arch}}]}).encode()
    fake.add_manifest("t/multi", "win", windows, OCI_INDEX)
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/multi:win", tmp_path, fake.settings)
    assert caught.value.reason == "not_found" and "windows/" in str(caught.value)


def test_bearer_token_flow(fake, tmp_path):
    small_image(fake)
    fake.bearer = ("robot", "s3cret")
    settings = {fake.host: {"insecure": True, "username": "robot", "password": "s3cret"}}
    assert ensure_rootfs(f"{fake.host}/t/app:1", tmp_path / "ok", settings).rootfs.is_dir()
    settings[fake.host]["password"] = "wrong"
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/app:1", tmp_path / "no", settings)
    assert caught.value.reason == "auth" and "wrong" not in str(caught.value)


def test_503_is_retried_and_404_is_not(fake, tmp_path):
    small_image(fake)
    fake.fail_next = 3
    assert ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, fake.settings, retry_seconds=60)
    before = sum(fake.gets.values())
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/none:1", tmp_path, fake.settings, retry_seconds=60)
    assert caught.value.reason == "not_found" and sum(fake.gets.values()) == before + 1


def test_a_docker_hub_mirror_is_used(fake, tmp_path):
    fake.add_image("library/mirrored", "1", [layer(("from-mirror", "file", "yes"))])
    settings: dict[str, dict[str, object]] = {"docker.io": {"mirrors": [fake.host]},
                                              fake.host: {"insecure": True}}
    root = ensure_rootfs("mirrored:1", tmp_path, settings)
    assert (root.rootfs / "from-mirror").read_text() == "yes"
    assert root.reference == "docker.io/library/mirrored:1"


# --- HTTP: redirects, keep-alive, proxies ------------------------------------------------

@pytest.fixture
def storage():
    """A second fake registry, standing for the object storage a registry redirects blobs to."""
    server = FakeRegistry()
    yield server
    server.close()


@pytest.fixture
def proxy_env(monkeypatch):
    """monkeypatch, with every *_proxy variable of the caller's environment removed."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    return monkeypatch


def with_bearer(fake: FakeRegistry) -> dict:
    fake.bearer = ("robot", "s3cret")
    return {fake.host: {"insecure": True, "username": "robot", "password": "s3cret"}}


def test_blobs_redirected_to_another_host_get_no_credentials(fake, storage, tmp_path):
    small_image(fake)
    storage.blobs = fake.blobs
    fake.redirect_blobs = f"http://{storage.host}"
    root = ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, with_bearer(fake))
    assert (root.rootfs / "data" / "big").stat().st_size == 1 << 20
    assert list(storage.blob_gets().values()) == [1, 1, 1]  # config and two layers
    assert [auth for _, auth in storage.authorizations] == [None, None, None]
    sent = {auth for path, auth in fake.authorizations if "/blobs/" in path}
    assert sent == {"Bearer good-token"}


def test_a_challenge_from_a_redirect_target_gets_no_credentials(fake, storage, tmp_path):
    small_image(fake)
    storage.bearer = ("robot", "s3cret")  # storage's 401 names its own token service
    fake.redirect_blobs = f"http://{storage.host}"
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, {fake.host: {
            "insecure": True, "username": "robot", "password": "s3cret"}})
    assert caught.value.reason == "auth"
    assert not storage.gets["/token"] and not any(auth for _, auth in storage.authorizations)


def test_a_redirect_on_the_same_host_keeps_credentials(fake, tmp_path):
    small_image(fake)
    fake.redirect_blobs = "/storage"  # a relative Location
    assert ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, with_bearer(fake)).rootfs.is_dir()
    followed = [auth for path, auth in fake.authorizations if path.startswith("/storage/")]
    assert followed == ["Bearer good-token"] * 3


def test_a_redirect_loop_is_cut_short(fake, tmp_path):
    small_image(fake)
    fake.redirect_blobs = f"http://{fake.host}"  # every blob GET redirects to itself
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, fake.settings, retry_seconds=60)
    assert caught.value.reason == "invalid" and "more than 5 redirects" in str(caught.value)


def test_redirects_to_plain_http_or_other_schemes_are_refused():
    from funnel_hpc.worker.images.transport import Refused, Transport
    for location in ("http://cdn.example/blob", "file:///etc/passwd", "http://cdn:99999/x"):
        with pytest.raises(Refused):
            Transport()._redirect_target("https://registry.example/v2/x", location)
    assert Transport(allow_http=True)._redirect_target(
        "https://registry.example/v2/x", "http://cdn.example/blob") == "http://cdn.example/blob"


@needs("the test CA", CA_FILE.exists(), "scripts/setup/45-registry.sh makes it")
def test_ca_file_alone_vouches_for_the_registry_and_adds_to_the_system_cas_elsewhere():
    from funnel_hpc.worker.images.transport import tls_context
    system = tls_context(None, system=True).cert_store_stats()["x509_ca"]
    home = tls_context(str(CA_FILE), system=False).cert_store_stats()["x509_ca"]
    elsewhere = tls_context(str(CA_FILE), system=True).cert_store_stats()["x509_ca"]
    assert (home, elsewhere) == (1, system + 1) and system > 0


def test_one_connection_serves_a_whole_pull(fake, tmp_path):
    small_image(fake)
    ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, fake.settings)
    assert sum(fake.gets.values()) == 4 and len(fake.clients) == 1


def test_a_kept_alive_connection_the_server_closed_is_replaced(fake, tmp_path):
    small_image(fake)
    fake.silent_close = True  # no retry budget: only a fresh connection can save each GET
    assert ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, fake.settings, retry_seconds=0)
    assert sum(fake.gets.values()) == 4 and len(fake.clients) == 4


def test_http_proxy_from_the_environment(fake, proxy_env, tmp_path):
    small_image(fake)
    proxy_env.setenv("HTTP_PROXY", f"http://{fake.host}")  # the fake serves proxied GETs itself
    host = "registry.invalid:5000"  # only the proxy can reach it
    root = ensure_rootfs(f"{host}/t/app:1", tmp_path, {host: {"insecure": True}}, retry_seconds=0)
    assert root.rootfs.is_dir() and fake.proxied == {host: 4}


def test_no_proxy_bypasses_the_proxy_for_127_0_0_1(fake, proxy_env, tmp_path):
    small_image(fake)
    proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert ensure_rootfs(f"{fake.host}/t/app:1", tmp_path, fake.settings, retry_seconds=0)
    assert not fake.proxied


@pytest.mark.registry
def test_https_through_a_connect_proxy(real, proxy_env, tmp_path):
    proxy = ConnectProxy()
    try:
        proxy_env.setenv("HTTPS_PROXY", proxy.url)
        root = ensure_rootfs(f"{ANONYMOUS}/funnel/testimage:1", tmp_path, real)
    finally:
        proxy.close()
    assert (root.rootfs / "opt" / "funnel-test" / "marker").is_file()
    assert proxy.tunnels == [ANONYMOUS]  # one kept-alive tunnel for the whole pull


PULL_ONE = """
import json, sys, time
from pathlib import Path
from funnel_hpc.worker.images import ensure_rootfs
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
root = ensure_rootfs(sys.argv[1], sys.argv[2], {sys.argv[4]: {"insecure": True}})
print(json.dumps({"rootfs": str(root.rootfs),
                  "big": (root.rootfs / "data" / "big").stat().st_size}))
"""


def test_eight_concurrent_pulls_fetch_each_blob_once(fake, tmp_path):
    small_image(fake)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [subprocess.Popen(
        [sys.executable, "-c", PULL_ONE, f"{fake.host}/t/app:1", str(tmp_path / "cache"),
         str(go), fake.host], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(8)]
    go.touch()
    answers = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        answers.append(json.loads(out))
    assert len({answer["rootfs"] for answer in answers}) == 1
    assert all(answer["big"] == 1 << 20 for answer in answers)
    manifest = json.loads(fake.manifests[("t/app", "1")][0])
    digests = [manifest["config"]["digest"], *(item["digest"] for item in manifest["layers"])]
    assert fake.blob_gets() == dict.fromkeys(digests, 1)
    leftovers = list((tmp_path / "cache").rglob(".tmp-*"))
    assert leftovers == []


# --- layers ------------------------------------------------------------------------------

def apply(tmp_path: Path, *layers: bytes) -> Path:
    """Unpack layers into tmp_path/root (next to tmp_path/outside, which must stay untouched)."""
    paths = []
    for number, data in enumerate(layers):
        path = tmp_path / f"layer{number}.tar.gz"
        path.write_bytes(data)
        paths.append((path, {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                             "digest": digest_of(data), "size": len(data)}))
    unpack_layers(tmp_path / "root", paths, "test/image")
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path):
    """A directory beside the root that a hostile layer would like to write into."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "x").write_text("keep me")
    return directory


def outside_untouched(outside: Path) -> bool:
    return (sorted(p.name for p in outside.iterdir()) == ["x"]
            and (outside / "x").read_text() == "keep me" and (outside / "x").stat().st_nlink == 1)


HOSTILE = {
    "dot-dot escape": lambda out: [layer(("../outside/pwned", "file", "x"))],
    "dot-dot inside a name": lambda out: [layer(("a/../../outside/pwned", "file", "x"))],
    "absolute symlink, then a file through it": lambda out: [
        layer(("evil", "symlink", str(out)), ("evil/pwned", "file", "x"))],
    "relative symlink dir, then a file through it": lambda out: [
        layer(("up", "symlink", "../outside"), ("up/pwned", "file", "x"))],
    "symlink in a lower layer, file through it in the next": lambda out: [
        layer(("evil", "symlink", str(out))), layer(("evil/pwned", "file", "x"))],
    "symlink to a dir inside the root, then a file through it": lambda out: [
        layer(("real/", "dir", None), ("alias", "symlink", "real"), ("alias/f", "file", "x"))],
    "hard link to a file outside": lambda out: [layer(("passwd", "hardlink", str(out / "x")))],
    "hard link with dot-dot": lambda out: [layer(("passwd", "hardlink", "../outside/x"))],
    "hard link through a symlink": lambda out: [
        layer(("evil", "symlink", str(out)), ("passwd", "hardlink", "evil/x"))],
    "hard link to /etc/passwd": lambda out: [layer(("passwd", "hardlink", "/etc/passwd"))],
    "whiteout of ../x": lambda out: [
        layer(("f", "file", "x")), layer(("../outside/.wh.x", "file", ""))],
    "whiteout named ..": lambda out: [layer(("d/", "dir", None)), layer(("d/.wh...", "file", ""))],
    "file under a file": lambda out: [layer(("f", "file", "x"), ("f/g", "file", "y"))],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(case, tmp_path, outside):
    with pytest.raises(ImageError) as caught:
        apply(tmp_path, *HOSTILE[case](outside))
    assert caught.value.reason == "refused"
    assert "hostile layer entry" in str(caught.value)
    assert outside_untouched(outside)
    assert Path("/etc/passwd").stat().st_nlink == 1


def test_a_hostile_image_leaves_no_root(fake, tmp_path, outside):
    fake.add_image("t/evil", "1", [layer(("evil", "symlink", str(outside)),
                                         ("evil/pwned", "file", "x"))])
    with pytest.raises(ImageError) as caught:
        ensure_rootfs(f"{fake.host}/t/evil:1", tmp_path / "cache", fake.settings)
    assert caught.value.reason == "refused" and "'evil/pwned'" in str(caught.value)
    assert list((tmp_path / "cache" / "images").iterdir()) == []
    assert outside_untouched(outside)


def test_safe_oddities_are_applied(tmp_path, outside):
    root = apply(tmp_path, layer(
        ("/abs/file", "file", "re-rooted"),
        ("./bin/", "dir", None, 0o2777),
        ("bin/su", "file", "setuid", 0o4755),
        ("bin/again", "hardlink", "bin/su"),
        ("bin/link", "symlink", "/etc/passwd"),
        ("dev/null", "chardev", None),
        ("dev/fifo", "fifo", None),
        ("secret", "file", "s", 0o600),
        ("opt/a/b/c", "file", "implied parents")))
    assert (root / "abs" / "file").read_text() == "re-rooted"
    assert (root / "bin" / "su").stat().st_mode & 0o7777 == 0o755
    assert (root / "bin").stat().st_mode & 0o7777 == 0o755
    assert (root / "bin" / "again").stat().st_ino == (root / "bin" / "su").stat().st_ino
    assert os.readlink(root / "bin" / "link") == "/etc/passwd"
    assert not (root / "dev" / "null").exists() and not (root / "dev" / "fifo").exists()
    assert (root / "secret").stat().st_mode & 0o777 == 0o644
    assert (root / "opt" / "a" / "b" / "c").read_text() == "implied parents"


def test_a_file_replaces_a_symlink_instead_of_writing_through_it(tmp_path, outside):
    root = apply(tmp_path, layer(("f", "symlink", str(outside / "x"))),
                 layer(("f", "file", "new")))
    assert not (root / "f").is_symlink() and (root / "f").read_text() == "new"
    assert outside_untouched(outside)


def test_whiteouts_and_opaque_directories_across_layers(tmp_path):
    root = apply(
        tmp_path,
        layer(("a/x", "file", "1"), ("a/y", "file", "2"), ("b/z", "file", "3"),
              ("d/k", "file", "4"), ("d/sub/old", "file", "5"), ("e/", "dir", None)),
        layer(("a/.wh.x", "file", ""), (".wh.b", "file", ""), ("d/sub/newer", "file", "6"),
              ("d/.wh..wh..opq", "file", ""), ("d/new", "file", "7"), ("e/.wh.missing", "file", ""),
              ("f/late", "file", "8"), ("f/.wh.late", "file", "")))
    assert sorted(os.listdir(root / "a")) == ["y"]
    assert not (root / "b").exists()
    assert sorted(os.listdir(root / "d")) == ["new", "sub"]
    assert sorted(os.listdir(root / "d" / "sub")) == ["newer"]
    assert (root / "f" / "late").read_text() == "8", "a whiteout hides lower layers only"
    assert not list(root.rglob(".wh.*"))


def test_unsupported_and_broken_layers(tmp_path):
    data = layer(("f", "file", "x"))
    path = tmp_path / "l.tar.zst"
    path.write_bytes(data)
    zstd = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": digest_of(data), "size": len(data)}
    with pytest.raises(ImageError, match="unsupported layer media type") as caught:
        unpack_layers(tmp_path / "r1", [(path, zstd)], "test/image")
    assert caught.value.reason == "invalid"
    garbage = b"not a tarball at all" * 50
    path.write_bytes(garbage)
    descriptor = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                  "digest": digest_of(garbage), "size": len(garbage)}
    with pytest.raises(ImageError) as caught:
        unpack_layers(tmp_path / "r2", [(path, descriptor)], "test/image")
    assert caught.value.reason == "invalid"


def test_uncompressed_layers(tmp_path):
    data = layer(("plain", "file", "tar"), gzipped=False)
    path = tmp_path / "l.tar"
    path.write_bytes(data)
    unpack_layers(tmp_path / "root", [(path, {
        "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(data),
        "size": len(data)})], "test/image")
    assert (tmp_path / "root" / "plain").read_text() == "tar"


def test_a_hard_link_to_itself_is_harmless(tmp_path):
    root = apply(tmp_path, layer(("f", "file", "x"), ("f", "hardlink", "f")))
    assert (root / "f").read_text() == "x"
