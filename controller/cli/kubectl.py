"""`kubectl pluginctl`: the kubectl plugin (`kubectl-pluginctl` on PATH). `status`, `explain`,
`plan` and `reconcile` for the Workspaces of the current kubeconfig context and namespace, read
from the cluster alone: the objects, the status the operator mirrors into them, and their
Events. It runs kubectl itself, so it logs in exactly as kubectl does (KUBECONFIG, contexts,
exec credential plugins) and needs no database. Exit codes as pluginctl's: 0 in sync / done,
2 not, 1 could not run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click

from controller.cli.base import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, Failure, clip, iso, run_group, when
from controller.domain import desired as desired_mod
from controller.domain.explain import age
from controller.domain.models import API_GROUP, DesiredWorkspace, utcnow
from controller.domain.render import table
from controller.domain.status import PluginState
from controller.kube.conditions import REQUESTED_AT, ConditionReason

WORKSPACES = f"workspaces.{API_GROUP}"  # qualified: other CRDs may be called "workspaces"
TEMPLATES = f"workspacetemplates.{API_GROUP}"
#: Every kubectl call gets this long from the API server (kubectl's --request-timeout).
REQUEST_TIMEOUT = 20
#: How often `reconcile --wait` looks at the Workspace; and says it is still waiting.
POLL_SECONDS = 0.5
STILL_WAITING_EVERY = 10.0
EVENTS_SHOWN = 8
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
MORE_FROM_THE_STORE = ("What each runtime reported, who installed what and the restart budget\n"
                       "are in the operator's database: pluginctl explain {id} --kubernetes "
                       "--db URL")


# --- kubectl -----------------------------------------------------------------------------------

class NotFound(Failure):
    """The object asked for does not exist."""


@dataclass(frozen=True)
class Kubectl:
    """kubectl, pointed where the user pointed it: its kubeconfig and context flags, and the
    namespace (given, or the context's, else `default`)."""

    binary: str
    flags: tuple[str, ...]
    namespace: str
    all_namespaces: bool = False

    def run(self, *args: str, missing: str | None = None) -> str:
        command = [self.binary, *self.flags, f"--request-timeout={REQUEST_TIMEOUT}s", *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=REQUEST_TIMEOUT + 10, check=False)
        except subprocess.TimeoutExpired as error:
            raise Failure(f"kubectl {args[0]} did not answer within "
                          f"{REQUEST_TIMEOUT + 10}s") from error
        if result.returncode != 0:
            raise _failure(result.stderr, missing)
        return result.stdout

    def json(self, *args: str, missing: str | None = None) -> dict[str, Any]:
        try:
            value = json.loads(self.run(*args, "-o", "json", missing=missing))
        except ValueError as error:
            raise Failure(f"kubectl {args[0]} printed something other than JSON") from error
        if not isinstance(value, dict):
            raise Failure(f"kubectl {args[0]} printed something other than an object")
        return value

    def where(self) -> tuple[str, ...]:
        return ("--all-namespaces",) if self.all_namespaces else ("-n", self.namespace)

    def listed(self, *resources: str) -> list[dict[str, Any]]:
        items = self.json("get", ",".join(resources), *self.where()).get("items")
        return [item for item in items or [] if isinstance(item, dict)]

    def workspace(self, name: str) -> dict[str, Any]:
        return self.json("get", WORKSPACES, name, "-n", self.namespace,
                         missing=f"no Workspace {name} in namespace {self.namespace}")


def _failure(stderr: str, missing: str | None) -> Failure:
    said = [line for line in stderr.strip().splitlines() if line.strip()]
    last = said[-1] if said else "kubectl failed and said nothing"
    if "doesn't have a resource type" in stderr:
        return Failure(f"the pluginctl CRDs (Workspace, WorkspaceTemplate) are not installed in "
                       f"this cluster: `kubectl apply -k manifests/` installs them ({last})")
    if "(NotFound)" in stderr and missing is not None:
        return NotFound(missing)
    return Failure(re.sub(r"^error: ", "", last, flags=re.IGNORECASE))


def connect(kubeconfig: str | None, context: str | None, namespace: str | None,
            all_namespaces: bool = False) -> Kubectl:
    """kubectl with the user's kubeconfig and context, and the namespace to work in."""
    binary = shutil.which("kubectl")
    if binary is None:
        raise Failure("kubectl is not on PATH (kubectl pluginctl runs it to reach the cluster)")
    flags = tuple([f"--kubeconfig={kubeconfig}"] * bool(kubeconfig)
                  + [f"--context={context}"] * bool(context))
    kubectl = Kubectl(binary, flags, namespace or "default", all_namespaces)
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not kubeconfig \
        and not context and not os.environ.get("KUBECONFIG")
    try:
        config = kubectl.json("config", "view", "--minify")
    except Failure as error:
        if not in_cluster:
            raise Failure(f"no kubeconfig context to use ({error}): set KUBECONFIG, pass "
                          "--kubeconfig, or choose one with --context or `kubectl config "
                          "use-context`") from error
        config = {}
    if namespace:
        return kubectl
    contexts = config.get("contexts") or [{}]
    found = ((contexts[0] or {}).get("context") or {}).get("namespace")
    if not found and in_cluster and os.path.exists(SERVICE_ACCOUNT_NAMESPACE):
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as stream:
            found = stream.read().strip()
    return Kubectl(binary, flags, found or "default", all_namespaces)


# --- what the operator wrote -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    since: datetime | None


@dataclass(frozen=True, slots=True)
class PluginLine:
    name: str
    source: str
    state: str  # a PluginState value
    message: str
    attempts: int
    next_retry_at: datetime | None


@dataclass(frozen=True)
class WorkspaceView:
    """One Workspace as the cluster shows it: its spec, and the status the operator wrote
    (`phase` None: the operator has written none yet)."""

    namespace: str
    name: str
    workspace_id: str
    template: str | None
    generation: int | None
    observed_generation: int | None
    phase: str | None
    plugins_ready: str | None
    plugins: tuple[PluginLine, ...]
    conditions: Mapping[str, Condition]
    requested_at: str | None
    handled_at: str | None
    token_secret: str | None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ready(self) -> bool:
        ready = self.conditions.get("Ready")
        return ready is not None and ready.status == "True"

    @property
    def current(self) -> bool:
        """The status speaks of the spec as it is now."""
        return self.phase is not None and self.observed_generation == self.generation

    def said(self, kind: str = "Ready") -> str:
        """`True (InSync): 2/2 plugins installed`: one condition in a line."""
        condition = self.conditions.get(kind)
        if condition is None:
            return "unknown (no status written yet)"
        return f"{condition.status} ({condition.reason})" + (
            f": {condition.message}" if condition.message else "")


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def workspace_view(obj: Mapping[str, Any]) -> WorkspaceView:
    metadata, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    plugins = tuple(
        PluginLine(str(p.get("name", "")), str(p.get("source", "")), str(p.get("state", "")),
                   str(p.get("message") or ""), _int(p.get("attempts")) or 0,
                   _time(p.get("nextRetryAt")))
        for p in status.get("plugins") or [] if isinstance(p, dict))
    conditions = {
        str(c.get("type")): Condition(str(c.get("type")), str(c.get("status", "Unknown")),
                                      str(c.get("reason") or ""), str(c.get("message") or ""),
                                      _time(c.get("lastTransitionTime")))
        for c in status.get("conditions") or [] if isinstance(c, dict)}
    return WorkspaceView(
        namespace=str(metadata.get("namespace") or "default"),
        name=str(metadata.get("name", "")),
        workspace_id=str(spec.get("workspaceId") or metadata.get("name", "")),
        template=(spec.get("templateRef") or {}).get("name"),
        generation=_int(metadata.get("generation")),
        observed_generation=_int(status.get("observedGeneration")),
        phase=status.get("phase"), plugins_ready=status.get("pluginsReady"),
        plugins=plugins, conditions=conditions,
        requested_at=(metadata.get("annotations") or {}).get(REQUESTED_AT),
        handled_at=status.get("lastHandledReconcileAt"),
        token_secret=status.get("tokenSecretName"))


def desired_of(objects: Sequence[Mapping[str, Any]]) -> Callable[[WorkspaceView],
                                                                  DesiredWorkspace | None]:
    """What each Workspace's spec and template declare now (the operator's own merge), to
    name where each plugin comes from and what changed since the status was written."""
    desired = desired_mod.build(("cluster", obj) for obj in objects)

    def of(view: WorkspaceView) -> DesiredWorkspace | None:
        wanted = desired.workspaces.get(view.workspace_id)
        if wanted is not None and wanted.object_ref == view.ref:
            return wanted
        return next((d for d in desired.rejected if d.object_ref == view.ref), None)

    return of


def pending(view: WorkspaceView, wanted: DesiredWorkspace | None) -> list[str]:
    """What the next pass has to do or wait for, as far as the status and the spec tell
    (what each runtime reported is in the operator's database, not in the cluster)."""
    if view.phase is None:
        return ["nothing known yet: the operator has written no status (is it running?)"]
    lines = []
    if not view.current:
        lines.append(f"plan the new spec: generation {view.generation}, the status is of "
                     f"generation {view.observed_generation}")
    if view.phase == "Invalid":
        return [*lines, f"nothing: invalid desired state: {view.said('Stalled')}"]
    if view.phase != "Online":
        return lines
    if wanted is None or wanted.error:
        why = wanted.error if wanted is not None else "it no longer resolves"
        return [*lines, f"nothing: the spec is invalid now ({why}); the next pass marks it "
                        "Invalid and makes no calls"]
    declared = dict(wanted.plugins)
    for plugin in view.plugins:
        want = declared.pop(plugin.name, None)
        if want is None and plugin.state != PluginState.REMOVING.value:
            lines.append(f"remove {plugin.name} if pluginctl installed it: no longer declared")
        elif want is not None and want.source != plugin.source:
            lines.append(f"install {plugin.name} from {want.source} (was {plugin.source})")
        elif plugin.state == PluginState.PENDING.value:
            lines.append(f"install {plugin.name} from {plugin.source}")
        elif plugin.state == PluginState.REMOVING.value:
            lines.append(f"remove {plugin.name}: installed by pluginctl, no longer declared")
        elif plugin.state == PluginState.FAILED.value:
            retry = when(plugin.next_retry_at) if plugin.next_retry_at else "next pass"
            lines.append(f"retry {plugin.name} {retry} (failed {plugin.attempts}x): "
                         f"{plugin.message}")
        elif plugin.state == PluginState.REFUSED.value:
            lines.append(f"refused {plugin.name}: {plugin.message}")
    lines += [f"install {name} from {plugin.source} (declared since the last pass)"
              for name, plugin in sorted(declared.items())]
    reason = view.conditions["Ready"].reason if "Ready" in view.conditions else ""
    if reason == ConditionReason.RESTART_PENDING:
        lines.append("restart the runtime (an install asked for it)")
    elif reason == ConditionReason.RESTART_HELD:
        lines.append("restart the runtime once the restart budget allows it")
    elif reason == ConditionReason.GUARD_HOLDING:
        lines.append(f"held by the blast-radius guard: {view.conditions['Ready'].message}")
    return lines


def rollout_note(objects: Sequence[Mapping[str, Any]], view: WorkspaceView) -> str | None:
    """The rollout of the Workspace's template, from the template's status, while one is in
    flight: until its wave is let through, a workspace stays on the stable revision (which
    wave it is in is known to the store: `pluginctl explain` says)."""
    template = next((o for o in objects if o.get("kind") == "WorkspaceTemplate"
                     and o["metadata"].get("name") == view.template
                     and o["metadata"].get("namespace") == view.namespace), None)
    said = ((template or {}).get("status") or {}).get("rollout") or {}
    if not said.get("targetRevision"):
        return None
    return (f"template {view.template} is rolling out revision {said['targetRevision']} "
            f"({said.get('phase')}, wave {said.get('wave')} of {said.get('waves')}, "
            f"{said.get('updated')}/{said.get('workspaces')} updated"
            + (f": {said['message']}" if said.get("message") else "")
            + f"); workspaces not yet let through stay on {said.get('stableRevision')}, and "
              "the next pass below may be theirs only later")


def events_of(kubectl: Kubectl, view: WorkspaceView) -> list[dict[str, Any]]:
    found = kubectl.json("get", "events", "-n", view.namespace, "--field-selector",
                         f"involvedObject.kind=Workspace,involvedObject.name={view.name}")

    def stamp(event: Mapping[str, Any]) -> str:
        return str(event.get("lastTimestamp") or event.get("eventTime")
                   or (event.get("metadata") or {}).get("creationTimestamp") or "")

    events = [e for e in found.get("items") or [] if isinstance(e, dict)]
    return sorted(events, key=stamp)[-EVENTS_SHOWN:]


def events_table(events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    rows = []
    for event in events:
        stamp = _time(event.get("lastTimestamp"))
        rows.append([str(event.get("type", "")), str(event.get("reason", "")),
                     age(stamp, now) if stamp else "-", clip(str(event.get("message", "")), 100)])
    return table(["TYPE", "REASON", "AGE", "MESSAGE"], rows)


# --- the commands ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False

    def over(self, outer: Target) -> Target:
        """These options, with the ones given before the command name filling the gaps."""
        return Target(self.kubeconfig or outer.kubeconfig, self.context or outer.context,
                      self.namespace or outer.namespace,
                      self.all_namespaces or outer.all_namespaces)


def target_options(*, all_namespaces: bool) -> Callable[[Callable[..., Any]],
                                                         Callable[..., Any]]:
    """kubectl's own flags, before the command (`kubectl pluginctl -n team status`) or after."""
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option("--kubeconfig", default=None, metavar="FILE",
                         help="Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)."),
            click.option("--context", "kube_context", default=None,
                         help="Kubeconfig context (default: the current one)."),
            click.option("-n", "--namespace", default=None,
                         help="Namespace (default: the context's, else default)."),
        ]
        if all_namespaces:
            options.append(click.option("-A", "--all-namespaces", is_flag=True,
                                        help="Every namespace."))
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


def output_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-o", "--output", type=click.Choice(["table", "json"]),
                        default="table", show_default=True, help="Output format.")(function)


def _connect(ctx: click.Context, kubeconfig: str | None, kube_context: str | None,
             namespace: str | None, all_namespaces: bool = False) -> Kubectl:
    outer = ctx.find_object(Target) or Target()
    target = Target(kubeconfig, kube_context, namespace, all_namespaces).over(outer)
    return connect(target.kubeconfig, target.context, target.namespace,
                   target.all_namespaces)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@target_options(all_namespaces=True)
@click.pass_context
def kubectl_cli(ctx: click.Context, kubeconfig: str | None, kube_context: str | None,
                namespace: str | None, all_namespaces: bool) -> None:
    """pluginctl for kubectl users: the Workspaces of the current context and namespace, as
    the operator's status and Events show them. No database needed: the operator writes what
    it knows into each Workspace's status."""
    ctx.obj = Target(kubeconfig, kube_context, namespace, all_namespaces)


@kubectl_cli.command("status")
@target_options(all_namespaces=True)
@output_option
@click.pass_context
def status_command(ctx: click.Context, kubeconfig: str | None, kube_context: str | None,
                   namespace: str | None, all_namespaces: bool, output: str) -> None:
    """Per Workspace: phase, plugins installed of desired, Ready and why, drift, the last
    error and the next retry (as pluginctl status, from the operator's status)."""
    kubectl = _connect(ctx, kubeconfig, kube_context, namespace, all_namespaces)
    views = sorted((workspace_view(o) for o in kubectl.listed(WORKSPACES)),
                   key=lambda v: (v.namespace, v.name))
    if output == "json":
        click.echo(json.dumps({"namespace": None if kubectl.all_namespaces
                               else kubectl.namespace,
                               "workspaces": [view_json(v) for v in views]}, indent=2))
        return
    if not views:
        where = "any namespace" if kubectl.all_namespaces else f"namespace {kubectl.namespace}"
        click.echo(f"no Workspaces in {where}")
        return
    rows = []
    for view in views:
        ready = view.conditions.get("Ready")
        failed = [p for p in view.plugins if p.state == PluginState.FAILED.value]
        error = failed[0].message if failed else (
            view.conditions["Stalled"].message if "Stalled" in view.conditions
            and view.conditions["Stalled"].status == "True" else "")
        retries = [p.next_retry_at for p in view.plugins if p.next_retry_at is not None]
        rows.append([*([view.namespace] if kubectl.all_namespaces else []), view.name,
                     (view.phase or "-") + ("" if view.current or view.phase is None else "*"),
                     view.plugins_ready or "-", "yes" if view.ready else "no",
                     ready.reason if ready else "-",
                     ", ".join(f"{p.name}: {p.state.lower()}" for p in view.plugins
                               if p.state != PluginState.INSTALLED.value) or "-",
                     clip(error or "-"), when(min(retries)) if retries else "-"])
    click.echo(table([*(["NAMESPACE"] if kubectl.all_namespaces else []), "WORKSPACE",
                      "PHASE", "PLUGINS", "READY", "REASON", "DRIFT", "LAST ERROR",
                      "NEXT RETRY"], rows))
    if any(not v.current and v.phase is not None for v in views):
        click.echo("* the spec changed since this status was written: the next pass plans it")


@kubectl_cli.command("explain")
@click.argument("workspace")
@target_options(all_namespaces=False)
@output_option
@click.pass_context
def explain_command(ctx: click.Context, workspace: str, kubeconfig: str | None,
                    kube_context: str | None, namespace: str | None, output: str) -> None:
    """Why the Workspace WORKSPACE (its name) is or is not Ready: its conditions, which
    template or Workspace entry declares each plugin and its state, its recent Events, and
    what the next pass has to do.

    Exit 0: Ready. Exit 2: not Ready. Exit 1: no such Workspace, or could not run."""
    kubectl = _connect(ctx, kubeconfig, kube_context, namespace)
    view = workspace_view(kubectl.workspace(workspace))
    objects = kubectl.listed(TEMPLATES, WORKSPACES)
    wanted = desired_of(objects)(view)
    rollout = rollout_note(objects, view)
    events = events_of(kubectl, view)
    next_pass = pending(view, wanted)

    def declared_by(name: str) -> str | None:
        origin = wanted.declared_by.get(name) if wanted is not None else None
        return None if origin is None else \
            f"{origin.kind} {view.namespace}/{origin.name} spec.plugins[{origin.index}]"

    if output == "json":
        click.echo(json.dumps({
            **view_json(view),
            "plugins": [{**plugin_json(p), "declared_by": declared_by(p.name)}
                        for p in view.plugins],
            "events": [{"type": e.get("type"), "reason": e.get("reason"),
                        "message": e.get("message"), "count": e.get("count"),
                        "last_timestamp": e.get("lastTimestamp")} for e in events],
            "next_pass": next_pass, "rollout": rollout}, indent=2))
        sys.exit(EXIT_OK if view.ready else EXIT_DRIFT)
    now = utcnow()

    def since(kind: str) -> str:
        condition = view.conditions.get(kind)
        return f" (since {age(condition.since, now)} ago)" if condition and condition.since \
            else ""

    origin = f"id {view.workspace_id}" + (f", template {view.template}" if view.template else "")
    generation = ("of the current spec" if view.current else
                  f"of generation {view.observed_generation}; the spec is at "
                  f"{view.generation}, not yet planned") if view.phase else "none written yet"
    lines = [
        f"Workspace:      {view.ref} ({origin})",
        f"Phase:          {view.phase or '-'}",
        f"Plugins:        {view.plugins_ready or '-'} installed as declared",
        f"Ready:          {view.said('Ready')}{since('Ready')}",
        f"Reconciling:    {view.said('Reconciling')}",
        f"Stalled:        {view.said('Stalled')}",
        f"Status:         {generation}",
        f"Last request:   {view.handled_at or 'none'} handled"
        + ("" if view.requested_at in (None, view.handled_at) else
           f"; {view.requested_at} not yet"),
        f"Token Secret:   {view.token_secret or '-'}",
        *([f"Rollout:        {rollout}"] if rollout else []),
        "",
    ]
    if view.plugins:
        lines.append(table(
            ["PLUGIN", "DECLARED BY", "SOURCE", "STATE", "DETAIL", "FAILURES", "NEXT RETRY"],
            [[p.name, declared_by(p.name) or "not declared", p.source, p.state,
              clip(p.message or "-"), str(p.attempts) if p.attempts else "-",
              when(p.next_retry_at) if p.next_retry_at else "-"] for p in view.plugins]))
    else:
        lines.append("No plugins in the status.")
    lines += ["", "Events:"]
    lines += [f"  {line}" for line in events_table(events, now).splitlines()] \
        if events else ["  none"]
    lines += ["", "Next pass:"] + [f"  {line}" for line in next_pass or [
        "nothing to do" if view.ready or view.phase == "Online"
        else f"nothing: {view.conditions['Ready'].message or view.phase}"
        if "Ready" in view.conditions else "nothing"]]
    lines += ["", MORE_FROM_THE_STORE.format(id=view.workspace_id)]
    click.echo("\n".join(lines))
    sys.exit(EXIT_OK if view.ready else EXIT_DRIFT)


@kubectl_cli.command("plan")
@target_options(all_namespaces=True)
@output_option
@click.pass_context
def plan_command(ctx: click.Context, kubeconfig: str | None, kube_context: str | None,
                 namespace: str | None, all_namespaces: bool, output: str) -> None:
    """What the next pass has to do per Workspace, from the operator's status and the spec as
    it is now: installs, removals, retries, restarts, refusals, holds and invalid specs.
    Nothing is called or written. (`pluginctl plan --kubernetes --db URL` plans the exact
    actions from what each runtime reported.)

    Exit 0: nothing to do. Exit 2: something to do or wait for. Exit 1: could not run."""
    kubectl = _connect(ctx, kubeconfig, kube_context, namespace, all_namespaces)
    objects = kubectl.listed(TEMPLATES, WORKSPACES)
    wanted = desired_of(objects)
    views = sorted((workspace_view(o) for o in objects if o.get("kind") == "Workspace"),
                   key=lambda v: (v.namespace, v.name))
    planned = [(view, lines) for view in views if (lines := pending(view, wanted(view)))]
    if output == "json":
        click.echo(json.dumps({"workspaces": [
            {"namespace": v.namespace, "name": v.name, "workspace_id": v.workspace_id,
             "pending": lines} for v, lines in planned]}, indent=2))
    else:
        rows = [[(v.ref if kubectl.all_namespaces else v.name) if i == 0 else "", line]
                for v, lines in planned for i, line in enumerate(lines)]
        if rows:
            click.echo(table(["WORKSPACE", "PENDING"], rows))
        click.echo(f"{len(views)} Workspace(s), {len(planned)} with something to do or wait "
                   "for (from the operator's status and the current spec)")
    sys.exit(EXIT_DRIFT if planned else EXIT_OK)


def duration(value: str) -> float:
    """`60`, `60s`, `2m`, `1h`, `1m30s` (kubectl's --timeout form) as seconds."""
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?",
                         value.strip())
    if not value.strip() or parts is None:
        raise click.BadParameter(f"expected a duration such as 60s, 2m or 1m30s, got {value!r}")
    hours, minutes, seconds = (float(p) if p else 0.0 for p in parts.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise click.BadParameter("must be more than 0")
    return total


@kubectl_cli.command("reconcile")
@click.argument("workspace")
@target_options(all_namespaces=False)
@click.option("--wait", is_flag=True,
              help="Wait until the operator has handled the request (its status echoes it), "
                   "then exit 0 if the Workspace is Ready, 2 if not.")
@click.option("--timeout", default="60s", show_default=True, metavar="DURATION",
              help="With --wait: give up after this long (exit 1), e.g. 90s or 2m.")
@click.pass_context
def reconcile_command(ctx: click.Context, workspace: str, kubeconfig: str | None,
                      kube_context: str | None, namespace: str | None, wait: bool,
                      timeout: str) -> None:
    """Ask the operator for a pass over the Workspace WORKSPACE now: sets its
    reconcile.pluginctl.dev/requestedAt annotation to the current time, which the operator
    echoes in status.lastHandledReconcileAt once a pass has handled it (as `flux reconcile`).

    Exit 0: requested (with --wait: handled, and Ready). Exit 2: handled, not Ready. Exit 1:
    no such Workspace, the time ran out, or could not run."""
    limit = duration(timeout)
    kubectl = _connect(ctx, kubeconfig, kube_context, namespace)
    ref = f"{kubectl.namespace}/{workspace}"
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kubectl.run("annotate", WORKSPACES, workspace, "-n", kubectl.namespace, "--overwrite",
                f"{REQUESTED_AT}={stamp}",
                missing=f"no Workspace {workspace} in namespace {kubectl.namespace}")
    click.echo(f"annotated Workspace {ref} with {REQUESTED_AT}={stamp}")
    if not wait:
        click.echo("requested: the operator's next look at it handles it (--wait waits for "
                   "that)")
        return
    click.echo(f"waiting up to {timeout} for the operator to handle the request")
    started = time.monotonic()
    deadline, said, last_said = started + limit, "", started
    while True:
        view = workspace_view(kubectl.workspace(workspace))
        if view.handled_at == stamp:
            break
        now = time.monotonic()
        state = f"{view.phase or 'no status yet'}, Ready {view.said('Ready')}"
        if state != said or now - last_said >= STILL_WAITING_EVERY:
            click.echo(f"  {'still waiting' if state == said else 'status'} "
                       f"({now - started:.0f}s): {state}")
            said, last_said = state, now
        if now + POLL_SECONDS > deadline:
            click.echo(f"error: the operator did not handle the request within {timeout} (is "
                       "it running? `kubectl get lease pluginctl-leader -A` names the replica "
                       f"that runs passes); the Workspace is {state}", err=True)
            sys.exit(EXIT_ERROR)
        time.sleep(POLL_SECONDS)
    elapsed = time.monotonic() - started
    if view.ready:
        click.echo(f"handled after {elapsed:.1f}s: Ready {view.said('Ready')}")
        sys.exit(EXIT_OK)
    click.echo(f"handled after {elapsed:.1f}s, not Ready: {view.phase}, Ready "
               f"{view.said('Ready')} (kubectl pluginctl explain {workspace} says why)")
    sys.exit(EXIT_DRIFT)


# --- JSON -------------------------------------------------------------------------------------

def plugin_json(plugin: PluginLine) -> dict[str, Any]:
    return {"name": plugin.name, "source": plugin.source, "state": plugin.state,
            "message": plugin.message, "attempts": plugin.attempts,
            "next_retry_at": iso(plugin.next_retry_at)}


def view_json(view: WorkspaceView) -> dict[str, Any]:
    return {
        "namespace": view.namespace, "name": view.name, "workspace_id": view.workspace_id,
        "template": view.template, "phase": view.phase, "plugins_ready": view.plugins_ready,
        "ready": view.ready, "status_current": view.current,
        "generation": view.generation, "observed_generation": view.observed_generation,
        "conditions": {kind: {"status": c.status, "reason": c.reason, "message": c.message,
                              "since": iso(c.since)} for kind, c in view.conditions.items()},
        "plugins": [plugin_json(p) for p in view.plugins],
        "requested_at": view.requested_at, "last_handled_reconcile_at": view.handled_at,
        "token_secret": view.token_secret,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """`kubectl-pluginctl`: kubectl runs it for `kubectl pluginctl ...`."""
    run_group(kubectl_cli, argv, prog_name="kubectl pluginctl")
