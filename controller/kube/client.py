"""The Kubernetes API adapter: the only module that imports the official `kubernetes`
client. Plain dicts in and out; API errors become KubeError. Calls are synchronous: async
callers run them with `asyncio.to_thread`."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError as TransportError

from controller.domain.models import API_GROUP, API_VERSION, Unavailable

log = logging.getLogger("pluginctl.kube")

WORKSPACES = "workspaces"
TEMPLATES = "workspacetemplates"


#: A lease call that takes longer has failed: the leader must find out in time to step down.
LEASE_CALL_SECONDS = 5.0
#: Any other call to the API server that takes longer has failed.
KUBE_CALL_SECONDS = 30.0
#: Threads (and pooled connections) for calls to the API server: the status writer keeps
#: `status_writer.WRITES_IN_FLIGHT` of them busy at most, the rest are for leases and LISTs.
KUBE_THREADS = 24
#: Objects per page of a LIST.
LIST_PAGE = 500
T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Listing:
    """The objects of one LIST, and the collection's resourceVersion (the point in the
    cluster's history the list shows)."""

    items: list[dict[str, Any]]
    version: str | None


class KubeError(Unavailable):
    """A Kubernetes API call failed; `status` is the HTTP status (0 when unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Connection:
    """What kopf needs to log in the same way this client did."""

    server: str
    token: str | None
    ca_path: str | None
    insecure: bool
    certificate_path: str | None
    private_key_path: str | None
    namespace: str | None


def _error(action: str, error: Exception) -> KubeError:
    if isinstance(error, ApiException):
        reason = error.reason or ""
        body = error.body if isinstance(error.body, str) else ""
        detail = body.strip()[:300] if body else reason
        return KubeError(f"{action}: HTTP {error.status}: {detail}", int(error.status or 0))
    return KubeError(f"{action}: {type(error).__name__}: {error}")


def _with_time_limit(api: Any) -> Any:
    """Every request of this client gets a time limit unless it brings its own (the
    client's default is none: a silent API server would hold a thread forever)."""
    send = api.rest_client.request

    def request(method: str, url: str, *args: Any, _request_timeout: Any = None,
                **kwargs: Any) -> Any:
        return send(method, url, *args, _request_timeout=_request_timeout or KUBE_CALL_SECONDS,
                    **kwargs)

    api.rest_client.request = request
    return api


class KubeClient:
    """One configured API client (kubeconfig, a context in it, or in-cluster config)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        # The client's own annotations want model objects; this adapter speaks plain dicts,
        # which the client serialises as they are. Hence the `Any`s.
        config: Any = kubernetes.config
        configuration = kubernetes.client.Configuration()
        namespace: str | None = None
        try:
            if kubeconfig is None and context is None and os.environ.get(
                    "KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
                config.load_incluster_config(client_configuration=configuration)
                path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as stream:
                        namespace = stream.read().strip()
            else:
                config.load_kube_config(config_file=kubeconfig, context=context,
                                                   client_configuration=configuration)
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if context is None and active:
                    namespace = active.get("context", {}).get("namespace")
        except (ConfigException, OSError, TypeError, ValueError) as error:
            raise KubeError(f"cannot load Kubernetes configuration: {error}") from error
        if not configuration.verify_ssl:
            log.warning("TLS verification of the API server %s is off (the kubeconfig says "
                        "insecure-skip-tls-verify): its identity is not checked",
                        configuration.host)
        # urllib3 keeps this many connections per host (the client's default: 5 per CPU);
        # a call beyond them opens a connection it then throws away.
        configuration.connection_pool_maxsize = KUBE_THREADS
        self.configuration = configuration
        self.default_namespace = namespace
        self.api: Any = _with_time_limit(kubernetes.client.ApiClient(configuration))
        # Kubernetes calls get threads of their own: an API server that hangs must never
        # take the threads the store and the registry run on.
        self._executor = ThreadPoolExecutor(max_workers=KUBE_THREADS,
                                            thread_name_prefix="pluginctl-kube")
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        self.core: Any = kubernetes.client.CoreV1Api(self.api)
        self.coordination: Any = kubernetes.client.CoordinationV1Api(self.api)

    async def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call of this client on the client's own threads."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs))

    def connection(self) -> Connection:
        c = self.configuration
        authorization = (c.api_key or {}).get("authorization") or (c.api_key or {}).get(
            "BearerToken")
        token = authorization.split(" ", 1)[1] if authorization and " " in authorization \
            else authorization
        return Connection(server=c.host, token=token, ca_path=c.ssl_ca_cert,
                          insecure=not c.verify_ssl, certificate_path=c.cert_file,
                          private_key_path=c.key_file, namespace=self.default_namespace)

    def _plain(self, obj: Any) -> Any:
        return self.api.sanitize_for_serialization(obj)

    @staticmethod
    def _written(response: Any) -> None:
        """A write's answer, unread (`_preload_content=False`): the server echoes the whole
        object, which nothing here reads, and deserialising it (into the client's models, for
        Events and Secrets) cost more than the write itself on this side. Read to the end,
        so that the connection goes back to the pool."""
        response.read()
        response.release_conn()

    # --- pluginctl objects -----------------------------------------------------------------

    def list_objects(self, plural: str) -> Listing:
        return self._list_pages(f"list {plural}", functools.partial(
            self.custom.list_cluster_custom_object, API_GROUP, API_VERSION, plural))

    def _list_pages(self, action: str, list_call: Callable[..., Any]) -> Listing:
        """A LIST in pages of LIST_PAGE objects (one consistent snapshot, as one LIST is),
        each read raw and kept without its managedFields: 10,000 Workspaces in one answer,
        parsed whole and with the server's field records, were hundreds of megabytes at
        once, every resync."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            try:
                response = list_call(limit=LIST_PAGE, _continue=token, _preload_content=False)
                try:
                    page = json.loads(response.read())
                finally:
                    response.release_conn()
            except (ApiException, OSError, TransportError, ValueError) as error:
                raise _error(action, error) from error
            for item in page.get("items") or []:
                (item.get("metadata") or {}).pop("managedFields", None)
                items.append(item)
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return Listing(items, metadata.get("resourceVersion"))

    def patch_status(self, plural: str, namespace: str, name: str,
                     status: dict[str, Any]) -> None:
        try:
            self._written(self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, plural, name, {"status": status},
                _preload_content=False))
        except (ApiException, OSError, TransportError) as error:
            raise _error(f"patch status of {plural}/{namespace}/{name}", error) from error

    def remove_annotation(self, plural: str, namespace: str, name: str, key: str,
                          value: str) -> None:
        """Remove annotation `key` if it still says `value` (a JSON patch that tests it
        first: a newer value is left for its own turn; then a 422)."""
        path = "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")
        try:
            self._written(self.custom.patch_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, plural, name,
                [{"op": "test", "path": path, "value": value}, {"op": "remove", "path": path}],
                _content_type="application/json-patch+json", _preload_content=False))
        except (ApiException, OSError, TransportError) as error:
            raise _error(f"remove annotation {key} of {plural}/{namespace}/{name}",
                         error) from error

    # --- events ----------------------------------------------------------------------------

    def create_event(self, involved: dict[str, Any], event_type: str, reason: str,
                     *, message: str, now: datetime, instance: str) -> None:
        metadata = involved.get("metadata", {})
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata.get('name')}.",
                         "namespace": metadata.get("namespace")},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                "name": metadata.get("name"), "namespace": metadata.get("namespace"),
                "uid": metadata.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": "pluginctl"},
            "reportingComponent": "pluginctl",
            "reportingInstance": instance[:128],
        }
        try:
            self._written(self.core.create_namespaced_event(metadata.get("namespace"), body,
                                                            _preload_content=False))
        except (ApiException, OSError, TransportError) as error:
            raise _error(f"create event {reason}", error) from error

    # --- token secrets ---------------------------------------------------------------------

    def list_secrets(self, label_selector: str) -> Listing:
        return self._list_pages("list secrets", functools.partial(
            self.core.list_secret_for_all_namespaces, label_selector=label_selector))

    def apply_secret(self, namespace: str, body: dict[str, Any]) -> None:
        """Create the Secret, or replace its data if it exists."""
        name = body["metadata"]["name"]
        try:
            self._written(self.core.create_namespaced_secret(namespace, body,
                                                             _preload_content=False))
            return
        except ApiException as error:
            if error.status != 409:
                raise _error(f"create secret {namespace}/{name}", error) from error
        except (OSError, TransportError) as error:
            raise _error(f"create secret {namespace}/{name}", error) from error
        try:
            self._written(self.core.patch_namespaced_secret(name, namespace, {
                "metadata": {"labels": body["metadata"].get("labels", {})},
                "stringData": body.get("stringData", {})}, _preload_content=False))
        except (ApiException, OSError, TransportError) as error:
            raise _error(f"update secret {namespace}/{name}", error) from error

    def delete_secret(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise _error(f"delete secret {namespace}/{name}", error) from error
        except (OSError, TransportError) as error:
            raise _error(f"delete secret {namespace}/{name}", error) from error

    # --- leases ----------------------------------------------------------------------------

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] = self._plain(
                self.coordination.read_namespaced_lease(name, namespace,
                                                       _request_timeout=LEASE_CALL_SECONDS))
            return lease
        except ApiException as error:
            if error.status == 404:
                return None
            raise _error(f"read lease {namespace}/{name}", error) from error
        except (OSError, TransportError) as error:
            raise _error(f"read lease {namespace}/{name}", error) from error

    def write_lease(self, namespace: str, body: dict[str, Any], create: bool) -> bool:
        """Create or replace (with the body's resourceVersion); False when someone else
        changed or created it first."""
        name = body["metadata"]["name"]
        try:
            if create:
                self.coordination.create_namespaced_lease(namespace, body,
                                                         _request_timeout=LEASE_CALL_SECONDS)
            else:
                self.coordination.replace_namespaced_lease(name, namespace, body,
                                                          _request_timeout=LEASE_CALL_SECONDS)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise _error(f"write lease {namespace}/{name}", error) from error
        except (OSError, TransportError) as error:
            raise _error(f"write lease {namespace}/{name}", error) from error
