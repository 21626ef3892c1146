"""A real Kubernetes control plane on loopback, as controller-runtime's envtest does: etcd plus
kube-apiserver (no kubelet, scheduler or controller-manager), an admin kubeconfig for kubectl,
RBAC on, and service-account tokens that work (TokenRequest). The end-to-end suite and
`pluginctl bench --kubernetes` run the operator on it; the binaries come from
$PLUGINCTL_KUBE_BIN or the cache `.ci/kube-binaries` fills (a checkout of the repository)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from ssl import CERT_NONE, create_default_context

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
    script = ROOT / ".ci" / "kube-binaries"
    if explicit:
        directory = Path(explicit)
    elif not script.exists():
        raise KubeUnavailable(
            "no kube-apiserver and etcd: set PLUGINCTL_KUBE_BIN to a directory holding both, "
            f"or run from a checkout of the repository (its {script.relative_to(ROOT)} "
            "builds them)")
    else:
        try:
            result = subprocess.run(["bash", str(script)], check=True,
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
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError as error:  # a test dependency: the product never signs anything
        raise KubeUnavailable("the control plane needs the 'cryptography' package for its "
                              "service-account keys (pip install 'pluginctl[test]')") from error

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
        path.write_text(yaml.safe_dump(kubeconfig_for(self.url, token, name)))
        return path

    def stop(self) -> None:
        """Stop the API server before etcd: an API server whose etcd is already gone spends
        20 s of its graceful shutdown on it (1 s otherwise)."""
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def kubeconfig_for(url: str, token: str, user: str) -> dict[str, object]:
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
        plane.kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(plane.url, ADMIN_TOKEN, "admin")))
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


def install_crds(plane: ControlPlane, timeout: float = 60) -> None:
    """Apply pluginctl's CRDs (the repository's crds/) and wait until they are served and
    published in the OpenAPI document that `kubectl explain` reads (a moment later)."""
    plane.kubectl("apply", "-f", str(ROOT / "crds"))
    plane.kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
                  "crd/workspaces.pluginctl.dev", "crd/workspacetemplates.pluginctl.dev")
    deadline = time.monotonic() + timeout
    while any(plane.kubectl("explain", kind, check=False).returncode != 0
              for kind in ("workspace", "workspacetemplate")):
        if time.monotonic() > deadline:
            raise KubeUnavailable("the CRDs never appeared in the OpenAPI document")
        time.sleep(0.5)
