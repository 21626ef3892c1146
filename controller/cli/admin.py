"""Administration: registry tokens, pausing one workspace, and schema migrations."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import click

from controller.cli.base import (
    Failure,
    cli,
    db_option,
    open_store,
    output_option,
    read_secret,
    workspace_id_arg,
)
from controller.domain import tokens
from controller.domain.models import InvalidSpec, check_workspace_id, utcnow
from controller.domain.render import table
from controller.registry.tokens import issue_token, issue_tokens
from controller.store import (
    current_revision,
    database_url,
    head_revision,
    make_engine,
    queries,
    transaction,
    upgrade,
)


@cli.group()
def token() -> None:
    """Registry tokens (one or more per workspace)."""


@token.command("create")
@click.argument("workspace_id", required=False)
@click.option("--from-file", "from_file", type=click.File("r", encoding="utf-8"),
              metavar="FILE",
              help="Create one token for each workspace id in FILE (one a line; blank lines "
                   "and # comments ignored; - for stdin), all in one transaction, and print "
                   'JSON lines {"workspace_id": ..., "token": ...}. A bad or repeated id '
                   "fails the whole file: nothing is written.")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def token_create(workspace_id: str | None, from_file: TextIO | None, db: str | None,
                 dry_run: bool) -> None:
    """Create a token for WORKSPACE_ID (or for each workspace in --from-file) and print it
    once; only its hash is stored."""
    if (workspace_id is None) == (from_file is None):
        raise click.UsageError("give either WORKSPACE_ID or --from-file FILE" +
                               (", not both" if workspace_id is not None else ""))
    if from_file is not None:
        _create_from_file(from_file, db, dry_run=dry_run)
    elif workspace_id is not None:
        _create_one(workspace_id_arg(workspace_id), db, dry_run=dry_run)


def _create_one(workspace_id: str, db: str | None, *, dry_run: bool) -> None:
    sessions = open_store(db)
    if dry_run:
        with transaction(sessions) as session:
            live = sum(1 for *_, revoked, _ in queries.tokens_of(session, workspace_id)
                       if revoked is None)
        click.echo(f"would create a token for workspace {workspace_id} (it has {live} live)")
        return
    secret = issue_token(sessions, workspace_id)
    click.echo(secret)
    if sys.stderr.isatty():
        click.echo("Store this token now: it is not shown again.", err=True)


#: Problems of a --from-file shown one by one before the command gives up.
SHOWN_PROBLEMS = 20


def _create_from_file(source: TextIO, db: str | None, *, dry_run: bool) -> None:
    workspace_ids = _read_workspace_ids(source)
    sessions = open_store(db)
    if dry_run:
        with transaction(sessions) as session:
            live = queries.with_live_tokens(session, workspace_ids)
        click.echo(f"would create a token for each of {len(workspace_ids)} workspace(s) "
                   f"({len(live)} of them have live tokens already)")
        return
    secrets = issue_tokens(sessions, workspace_ids)
    # Shown only once the transaction is committed: a token printed is a token that works.
    click.echo("".join(json.dumps({"workspace_id": workspace_id, "token": secret}) + "\n"
                       for workspace_id, secret in zip(workspace_ids, secrets, strict=True)),
               nl=False)
    if sys.stderr.isatty():
        click.echo(f"Store these {len(secrets)} tokens now: they are not shown again.",
                   err=True)


def _read_workspace_ids(source: TextIO) -> list[str]:
    """The workspace ids of a --from-file, in order; every bad or repeated line is reported
    by number and nothing is returned."""
    name = getattr(source, "name", "FILE")
    first_line: dict[str, int] = {}
    problems = []
    try:
        for number, line in enumerate(source, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                check_workspace_id(text)
            except InvalidSpec as error:
                problems.append(f"{name}:{number}: {error}")
                continue
            if text in first_line:
                problems.append(f"{name}:{number}: workspace id {text!r} repeats line "
                                f"{first_line[text]}")
                continue
            first_line[text] = number
    except UnicodeDecodeError as error:
        raise Failure(f"cannot read {name}: not UTF-8 text ({error.reason})") from error
    if problems:
        for problem in problems[:SHOWN_PROBLEMS]:
            click.echo(f"error: {problem}", err=True)
        more = len(problems) - SHOWN_PROBLEMS
        raise Failure(f"{len(problems)} bad line(s) in {name}"
                      + (f" ({more} not shown)" if more > 0 else "")
                      + "; no token was created")
    if not first_line:
        raise Failure(f"no workspace ids in {name}; no token was created")
    return list(first_line)


@token.command("runtime-secret")
@click.argument("workspace_id")
@click.option("--runtime-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              required=True, envvar="PLUGINCTL_RUNTIME_SECRET_FILE",
              help="The controller's secret (as given to `run --runtime-secret-file`).")
def token_runtime_secret(workspace_id: str, runtime_secret_file: Path) -> None:
    """Print the secret the controller sends WORKSPACE_ID's runtime with
    --runtime-secret-per-workspace (for `pluginctl agent --controller-secret-file`)."""
    try:
        check_workspace_id(workspace_id)
    except InvalidSpec as error:
        raise Failure(str(error)) from error
    secret = read_secret(runtime_secret_file, "--runtime-secret-file")
    assert secret is not None
    click.echo(tokens.runtime_secret_for(secret, workspace_id))


@token.command("list")
@click.argument("workspace_id")
@db_option
@output_option
def token_list(workspace_id: str, db: str | None, output: str) -> None:
    """List WORKSPACE_ID's tokens by fingerprint (the start of the stored hash)."""
    with transaction(open_store(db)) as session:
        found = queries.tokens_of(session, workspace_id_arg(workspace_id))
    if output == "json":
        click.echo(json.dumps({"workspace_id": workspace_id, "tokens": [
            {"fingerprint": tokens.fingerprint(token_hash), "created": created.isoformat(),
             "revoked": None if revoked is None else revoked.isoformat(), "issuer": issuer}
            for token_hash, created, revoked, issuer in found]}, indent=2))
        return
    click.echo(table(["FINGERPRINT", "CREATED", "REVOKED", "ISSUER"], [
        [tokens.fingerprint(token_hash), created.isoformat(timespec="seconds"),
         "-" if revoked is None else revoked.isoformat(timespec="seconds"), issuer]
        for token_hash, created, revoked, issuer in found]))


@token.command("revoke")
@click.argument("workspace_id")
@click.option("--fingerprint", "fingerprints", multiple=True, metavar="FP",
              help="A fingerprint from `pluginctl token list` (repeatable).")
@click.option("--token-stdin", is_flag=True,
              help="Read the token itself from standard input (never from the command line, "
                   "where it would land in shell history and process lists).")
@click.option("--all", "revoke_all", is_flag=True, help="Every token of the workspace.")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def token_revoke(*, workspace_id: str, fingerprints: tuple[str, ...], token_stdin: bool,
                 revoke_all: bool, db: str | None, dry_run: bool) -> None:
    """Revoke tokens of WORKSPACE_ID. Every registry replica refuses them within a second.

    To rotate without downtime: `token create` a second token, give it to the runtime, then
    revoke the old one by its fingerprint."""
    workspace_id = workspace_id_arg(workspace_id)
    if sum((bool(fingerprints), token_stdin, revoke_all)) != 1:
        raise click.UsageError("say which tokens: --fingerprint FP, --token-stdin or --all")
    sessions = open_store(db)
    with transaction(sessions) as session:
        live = {h for h, _, revoked, _ in queries.tokens_of(session, workspace_id)
                if revoked is None}
        if revoke_all:
            chosen = live
        elif token_stdin:
            digest = tokens.digest(sys.stdin.read().strip())
            if digest not in live:
                raise Failure(f"that token is not a live token of workspace {workspace_id}")
            chosen = {digest}
        else:
            chosen = set()
            for wanted in fingerprints:
                matches = {h for h in live if h.startswith(wanted.lower())}
                if len(wanted) < 8 or len(matches) != 1:
                    raise Failure(f"fingerprint {wanted!r} names {len(matches)} live tokens of "
                                  f"workspace {workspace_id} (give at least 8 characters of "
                                  "one shown by `pluginctl token list`)")
                chosen |= matches
        if dry_run:
            shown = ", ".join(sorted(tokens.fingerprint(h) for h in chosen)) or "none"
            click.echo(f"would revoke {len(chosen)} token(s) of workspace {workspace_id}: "
                       f"{shown}")
            return
        revoked = queries.revoke_tokens(session, chosen, utcnow())
    click.echo(f"revoked {revoked} token(s) of workspace {workspace_id}")


@cli.group()
def workspace() -> None:
    """Pause or resume the loop for one workspace."""


@workspace.command("pause")
@click.argument("workspace_id")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def workspace_pause(workspace_id: str, db: str | None, dry_run: bool) -> None:
    """Make WORKSPACE_ID dormant: no calls until `resume`, whatever its runtime reports."""
    _set_dormant(workspace_id, db, True, dry_run)


@workspace.command("resume")
@click.argument("workspace_id")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def workspace_resume(workspace_id: str, db: str | None, dry_run: bool) -> None:
    """Undo `pause`: WORKSPACE_ID is reconciled again when online."""
    _set_dormant(workspace_id, db, False, dry_run)


def _set_dormant(workspace_id: str, db: str | None, dormant: bool, dry_run: bool) -> None:
    workspace_id = workspace_id_arg(workspace_id)
    verb = "paused (dormant)" if dormant else "resumed"
    with transaction(open_store(db)) as session:
        if dry_run:
            seen = queries.load_observed(session, now=utcnow(),
                                         only=[workspace_id]).get(workspace_id)
            now = "unknown to the store" if seen is None else \
                "dormant" if seen.dormant else "active"
            click.echo(f"workspace {workspace_id} would be {verb} (now {now})")
            return
        queries.set_dormant(session, workspace_id, dormant)
    click.echo(f"workspace {workspace_id} {verb}")


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def db_upgrade(db: str | None, dry_run: bool) -> None:
    """Migrate the database to this version's schema (safe to run from several replicas)."""
    engine = make_engine(database_url(db))
    if dry_run:
        current, head = current_revision(engine), head_revision()
        click.echo(f"database already at revision {head}" if current == head else
                   f"would upgrade the database from {current or 'empty'} to revision {head}")
        return
    before, after = upgrade(engine)
    if before == after:
        click.echo(f"database already at revision {after}")
    else:
        click.echo(f"database upgraded from {before or 'empty'} to revision {after}")
