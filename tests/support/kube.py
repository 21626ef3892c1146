"""A real Kubernetes control plane on loopback for the end-to-end suite, as controller-runtime's
envtest does: etcd plus kube-apiserver (no kubelet, scheduler or controller-manager), an admin
kubeconfig for kubectl, RBAC on, and service-account tokens that work (TokenRequest)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from ssl import CERT_NONE, create_default_context
from typing import Any

import yaml

from controller.registry.serving import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "pluginctl-e2e-admin-token"


class KubeUnavailable(RuntimeError):
    pass


def binaries() -> Path:
    """The directory holding kube-apiserver and etcd: PLUGINCTL_KUBE_BIN, or the cache that
    `.ci/kube-binaries` fills (building them on first use)."""
    explicit = os.environ.get("PLUGINCTL_KUBE_BIN")
    if explicit:
        directory = Path(explicit)
    else:
        try:
            result = subprocess.run(["bash", str(ROOT / ".ci" / "kube-binaries")], check=True,
                                    capture_output=True, text=True, timeout=3600)
        except subprocess.CalledProcessError as error:
            raise KubeUnavailable(
                "could not build kube-apiserver and etcd with .ci/kube-binaries "
                f"(needs Go and the Go module proxy):\n{error.stderr[-3000:]}") from error
        directory = Path(result.stdout.strip().splitlines()[-1])
    for name in ("kube-apiserver", "etcd"):
        if not (directory / name).exists():
            raise KubeUnavailable(f"{directory / name} is missing")
    if shutil.which("kubectl") is None:
        raise KubeUnavailable("kubectl is not on PATH")
    return directory


def _keypair(directory: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = directory / "sa.key"
    public = directory / "sa.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@dataclass
class ControlPlane:
    directory: Path
    url: str
    kubeconfig: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                kubeconfig: Path | None = None, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["kubectl", *args], capture_output=True, text=True,
                                input=input, env=self.env(kubeconfig), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def kubeconfig_for_token(self, token: str, name: str) -> Path:
        path = self.directory / f"kubeconfig-{name}"
        path.write_text(yaml.safe_dump(_kubeconfig(self.url, token, name)))
        return path

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _kubeconfig(url: str, token: str, user: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": url,
                                                 "insecure-skip-tls-verify": True}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user,
                                                 "namespace": "default"}}],
        "current-context": "e2e",
    }


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    context = create_default_context()
    context.check_hostname = False
    context.verify_mode = CERT_NONE
    request = urllib.request.Request(url + "/readyz",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise KubeUnavailable(f"kube-apiserver exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise KubeUnavailable(f"kube-apiserver not ready after {timeout}s:\n"
                          f"{log.read_text()[-4000:]}")


def start() -> ControlPlane:
    bindir = binaries()
    directory = Path(tempfile.mkdtemp(prefix="pluginctl-kube-"))
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_log = (directory / "etcd.log").open("wb")
    etcd = subprocess.Popen(
        [str(bindir / "etcd"), "--data-dir", str(directory / "etcd"), "--name", "e2e",
         "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
         "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"e2e=http://127.0.0.1:{peer_port}",
         "--unsafe-no-fsync", "--log-level", "warn"],
        stdout=etcd_log, stderr=subprocess.STDOUT)
    plane = ControlPlane(directory, f"https://127.0.0.1:{api_port}",
                         directory / "kubeconfig", [etcd])
    try:
        (directory / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')
        private, public = _keypair(directory)
        log_path = directory / "kube-apiserver.log"
        api_log = log_path.open("wb")
        api = subprocess.Popen(
            [str(bindir / "kube-apiserver"),
             f"--etcd-servers=http://127.0.0.1:{etcd_port}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={api_port}", f"--cert-dir={directory / 'certs'}",
             f"--token-auth-file={directory / 'tokens.csv'}",
             "--authorization-mode=RBAC",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             f"--service-account-key-file={public}",
             f"--service-account-signing-key-file={private}",
             "--service-cluster-ip-range=10.0.0.0/24",
             "--allow-privileged=true",
             "--enable-priority-and-fairness=false",
             "--v=1"],
            stdout=api_log, stderr=subprocess.STDOUT)
        plane.processes.append(api)
        _wait_ready(plane.url, api, log_path, timeout=120)
        plane.kubeconfig.write_text(yaml.safe_dump(_kubeconfig(plane.url, ADMIN_TOKEN, "admin")))
        # The default namespace is made by a bootstrap controller of the apiserver itself.
        deadline = time.monotonic() + 60
        while plane.kubectl("get", "namespace", "default", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise KubeUnavailable("namespace default never appeared")
            time.sleep(0.3)
    except BaseException:
        plane.stop()
        raise
    return plane


class KubeProxy:
    """A plain-HTTP proxy in front of the API server, run in the test's event loop, through
    which an operator can be made to lose a share of its watch events, or lose the API
    server altogether (requests hang, as behind a dead network path)."""

    def __init__(self, plane: ControlPlane, loss: float = 0.0, seed: int = 7) -> None:
        import random

        self.plane = plane
        self.loss = loss
        self.rand = random.Random(seed)
        self.dropped: list[str] = []  # "TYPE kind/name" of every watch event dropped
        self.always_drop: set[str] = set()  # names whose every watch event is dropped
        self.reachable = asyncio.Event()
        self.reachable.set()
        self.url = ""
        self._runner: Any = None
        self._client: Any = None

    async def start(self) -> KubeProxy:
        import aiohttp
        from aiohttp import web

        from controller.registry.serving import start_site

        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False), skip_auto_headers=("Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self.url = f"http://127.0.0.1:{await start_site(self._runner, '127.0.0.1', 0)}"
        return self

    async def stop(self) -> None:
        self.reachable.set()
        await self._client.close()
        await self._runner.cleanup()

    def kubeconfig(self, name: str) -> Path:
        path = self.plane.directory / f"kubeconfig-proxy-{name}"
        path.write_text(yaml.safe_dump(_kubeconfig(self.url, ADMIN_TOKEN, "admin")))
        return path

    async def _forward(self, request: Any) -> Any:
        import json

        from aiohttp import web

        await self.reachable.wait()  # unreachable: the request hangs, nothing comes back
        hop = ("host", "content-length", "transfer-encoding", "connection", "accept-encoding")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in hop]
        async with self._client.request(request.method, self.plane.url + request.path_qs,
                                        data=await request.read(),
                                        headers=headers) as upstream:
            watching = request.query.get("watch") in ("true", "1")
            if not watching:
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    content_type=upstream.content_type)
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for line in upstream.content:
                await self.reachable.wait()  # a stream in flight stalls too
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {}
                kind = event.get("type")
                meta = (event.get("object") or {}).get("metadata") or {}
                if kind in ("ADDED", "MODIFIED", "DELETED") and (
                        meta.get("name") in self.always_drop or self.rand.random() < self.loss):
                    self.dropped.append(f"{kind} {request.path.rsplit('/', 1)[-1]}/"
                                        f"{meta.get('name')}")
                    continue
                await response.write(line)
            return response
