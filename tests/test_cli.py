"""The command line as a user meets it: `python -m eventsync …` and the `eventsync` script as
real subprocesses, a clean environment, a fresh working directory (so the only `.env` read is
the one a test writes there) and a FakeBookStack on 127.0.0.1 (DESIGN: Settings, Command line;
guarantees 6 and 12).

The fake runs in the test's event loop, so children are started with
asyncio.create_subprocess_exec: a blocking wait would stop the fake from answering."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import database_value

from eventsync.app import open_store
from eventsync.store.base import KINDS
from eventsync.store.mirror import SECTION_OF
from eventsync.store.postgres.driver import redacted
from eventsync.testing import FakeBookStack
from eventsync.testing.models import ALL_PERMISSIONS

# Every test runs on a SQLite file, then on PostgreSQL.
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("on_both_backends")]

FAKE_RPM = 100_000
CLIENT_RPM = "60000"  # below the fake's limit: no throttling, no "limit lowered" warning
SUBCOMMANDS = ("serve", "reconcile", "status", "export", "check", "dead-letters", "changes")
# An address nothing is asked of: commands that must stop on their settings never get there.
NOWHERE = "http://127.0.0.1:1"
GOOD_WEBHOOK_SECRET = "whsec-test-cli-3b9e0c7a5d1f48e2"

Env = Mapping[str, str]


# ---- running the command ----------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class Cli:
    """Runs eventsync in `workdir` with only PATH, a locale and the given EVENTSYNC_*."""

    workdir: Path

    async def __call__(
        self, *args: str, env: Env, script: bool = False, timeout: float = 30.0
    ) -> Result:
        assert all(k.startswith("EVENTSYNC_") for k in env), env
        clean = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", **env}
        command = (
            [str(Path(sys.executable).with_name("eventsync"))]
            if script
            else [sys.executable, "-m", "eventsync"]
        )
        proc = await asyncio.create_subprocess_exec(
            *command,
            *args,
            env=clean,
            cwd=self.workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(
                f"eventsync {' '.join(args)} did not finish in {timeout} s"
            ) from None
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())

    def write_env_file(self, values: Env) -> Path:
        path = self.workdir / ".env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return path

    def write_toml(self, values: Mapping[str, str] | str, name: str = "eventsync.toml") -> Path:
        """Keys without the prefix, lower case; a str is written as it is (broken TOML)."""
        path = self.workdir / name
        if isinstance(values, str):
            path.write_text(values)
        else:
            path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return path


def settings_for(
    fake: FakeBookStack | None,
    database: Path | None = None,
    *,
    token: tuple[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The EVENTSYNC_* variables for a run against `fake` (NOWHERE without one)."""
    token_id, token_secret = token or (
        (fake.token_id, fake.token_secret) if fake else ("id", "secret")
    )
    env = {
        "EVENTSYNC_BOOKSTACK_URL": fake.url if fake else NOWHERE,
        "EVENTSYNC_BOOKSTACK_TOKEN_ID": token_id,
        "EVENTSYNC_BOOKSTACK_TOKEN_SECRET": token_secret,
        "EVENTSYNC_REQUESTS_PER_MINUTE": CLIENT_RPM,
    }
    if database is not None:
        env["EVENTSYNC_DATABASE"] = database_value(database)
    env.update({f"EVENTSYNC_{k.upper()}": v for k, v in extra.items()})
    return env


def toml_keys(env: Env) -> dict[str, str]:
    return {k.removeprefix("EVENTSYNC_").lower(): v for k, v in env.items()}


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output, str(result)


def assert_one_line_error(result: Result, *names: str) -> None:
    """Exit 2, exactly one line on stderr, naming each of `names`, and no traceback."""
    assert result.code == 2, str(result)
    assert_no_traceback(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(result)
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


def summary_rows(stdout: str) -> dict[str, tuple[int, int, int, int]]:
    """created, updated, deleted, unchanged per kind from the reconcile summary table."""
    rows: dict[str, tuple[int, int, int, int]] = {}
    for kind in KINDS:
        match = re.search(rf"^{kind}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", stdout, re.MULTILINE)
        assert match, f"no summary row for {kind}:\n{stdout}"
        created, updated, deleted, unchanged = (int(g) for g in match.groups())
        rows[kind] = (created, updated, deleted, unchanged)
    return rows


def api_requests(stdout: str) -> int:
    match = re.search(r"API requests:\s*(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plain_pages(fake: FakeBookStack) -> list[int]:
    """Pages nothing includes and with no attachments: deleting one changes nothing else."""
    included: set[int] = set()
    for page in fake.state.pages.values():
        included.update(int(m) for m in re.findall(r"\{\{@(\d+)", page.html))
    with_files = {a.uploaded_to for a in fake.state.attachments.values()}
    return [p for p in sorted(fake.state.pages) if p not in included | with_files]


# ---- fixture factories --------------------------------------------------------------------------

FakeFactory = Callable[..., Awaitable[FakeBookStack]]
TokenFactory = Callable[..., Awaitable[tuple[str, str]]]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Cli(workdir)


@pytest.fixture
async def make_fake() -> AsyncIterator[FakeFactory]:
    """make_fake(pages=…, books=…, seed=…): a started, seeded FakeBookStack, stopped after."""
    async with AsyncExitStack() as stack:

        async def make(*, audit_log: bool = True, **seed: Any) -> FakeBookStack:
            fake = await stack.enter_async_context(
                FakeBookStack(requests_per_minute=FAKE_RPM, audit_log=audit_log)
            )
            fake.seed(**{"pages": 20, "books": 2, "seed": 3, **seed})
            return fake

        yield make


@pytest.fixture
def make_token() -> TokenFactory:
    """make_token(fake, permissions, expired=False): a token of a new user with one new role."""
    counter = 0

    async def make(
        fake: FakeBookStack, permissions: Iterable[str], *, expired: bool = False
    ) -> tuple[str, str]:
        nonlocal counter
        counter += 1
        role_id = await fake.create_role(f"CLI test role {counter}", permissions=permissions)
        user_id = await fake.create_user(
            f"CLI bot {counter}", f"cli-bot-{counter}@example.com", roles=[role_id]
        )
        token = (f"cli-token-{counter}", f"cli-secret-{counter}-9f2c6e1b7a4d08e3c5")
        expires = datetime.now(UTC) - timedelta(days=1) if expired else None
        fake.add_token(user_id, *token, expires_at=expires)
        return token

    return make


# ---- --help and the console script --------------------------------------------------------------


async def test_help_lists_every_subcommand_and_the_script_works(cli: Cli) -> None:
    module_help = await cli("--help", env={})
    script_help = await cli("--help", env={}, script=True)
    version = await cli("--version", env={}, script=True)
    for result in (module_help, script_help):
        assert result.code == 0, str(result)
        for name in SUBCOMMANDS:
            assert re.search(rf"^\s+{re.escape(name)}\s", result.stdout, re.MULTILINE), (
                f"{name} missing from --help:\n{result.stdout}"
            )
    assert script_help.stdout == module_help.stdout
    assert version.code == 0 and version.stdout.startswith("eventsync "), str(version)


# ---- settings: sources and precedence -----------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "dotenv", "toml", "mixed"])
async def test_check_reads_settings_from_every_source(
    cli: Cli, make_fake: FakeFactory, source: str
) -> None:
    fake = await make_fake()
    values = settings_for(fake)
    args: list[str] = []
    env: dict[str, str] = {}
    if source == "env":
        env = values
    elif source == "dotenv":
        cli.write_env_file(values)
    elif source == "toml":
        args = ["--config", str(cli.write_toml(toml_keys(values)))]
    else:  # one setting from each source
        env = {"EVENTSYNC_BOOKSTACK_URL": values["EVENTSYNC_BOOKSTACK_URL"]}
        cli.write_env_file({"EVENTSYNC_BOOKSTACK_TOKEN_ID": values["EVENTSYNC_BOOKSTACK_TOKEN_ID"]})
        secret = {"bookstack_token_secret": values["EVENTSYNC_BOOKSTACK_TOKEN_SECRET"]}
        args = ["--config", str(cli.write_toml(secret))]
    result = await cli(*args, "check", env=env)
    assert result.code == 0, str(result)
    assert "FAIL" not in result.stdout
    assert fake.url in result.stdout


@pytest.mark.sqlite_only("which source won is read off which file was created")
async def test_precedence_env_over_dotenv_over_toml(cli: Cli, tmp_path: Path) -> None:
    databases = {src: tmp_path / f"from-{src}.db" for src in ("toml", "dotenv", "env")}
    for path in databases.values():
        async with await open_store(path):
            pass
    toml = cli.write_toml({"database": str(databases["toml"])})
    cli.write_env_file({"EVENTSYNC_DATABASE": database_value(databases["dotenv"])})
    from_env = {"EVENTSYNC_DATABASE": database_value(databases["env"])}

    async def chosen(env: Env) -> str:
        result = await cli("--config", str(toml), "status", "--json", env=env)
        assert result.code == 0, str(result)
        database: str = json.loads(result.stdout)["database"]
        return database

    assert await chosen(from_env) == str(databases["env"])
    assert await chosen({}) == str(databases["dotenv"])
    (cli.workdir / ".env").unlink()
    assert await chosen({}) == str(databases["toml"])


# ---- settings: missing or invalid ---------------------------------------------------------------


@dataclass(frozen=True)
class BadSetting:
    command: tuple[str, ...]
    names: tuple[str, ...]  # what the one stderr line must name
    env: tuple[tuple[str, str | None], ...] = ()  # None: unset
    dotenv: str | None = None
    toml: str | None = None  # the file's text; "-" passes a --config file that does not exist


BAD_SETTINGS = {
    "missing url": BadSetting(
        ("check",), ("EVENTSYNC_BOOKSTACK_URL",), env=(("EVENTSYNC_BOOKSTACK_URL", None),)
    ),
    "missing token secret": BadSetting(
        ("reconcile",),
        ("EVENTSYNC_BOOKSTACK_TOKEN_SECRET",),
        env=(("EVENTSYNC_BOOKSTACK_TOKEN_SECRET", None),),
    ),
    "missing webhook secret for serve": BadSetting(("serve",), ("EVENTSYNC_WEBHOOK_SECRET",)),
    "requests per minute not a number": BadSetting(
        ("check",),
        ("EVENTSYNC_REQUESTS_PER_MINUTE",),
        env=(("EVENTSYNC_REQUESTS_PER_MINUTE", "abc"),),
    ),
    "requests per minute zero": BadSetting(
        ("reconcile",),
        ("EVENTSYNC_REQUESTS_PER_MINUTE",),
        env=(("EVENTSYNC_REQUESTS_PER_MINUTE", "0"),),
    ),
    "listen without port": BadSetting(
        ("serve",),
        ("EVENTSYNC_LISTEN",),
        env=(("EVENTSYNC_LISTEN", "localhost"), ("EVENTSYNC_WEBHOOK_SECRET", GOOD_WEBHOOK_SECRET)),
    ),
    "listen port out of range": BadSetting(
        ("serve",),
        ("EVENTSYNC_LISTEN",),
        env=(
            ("EVENTSYNC_LISTEN", "127.0.0.1:99999"),
            ("EVENTSYNC_WEBHOOK_SECRET", GOOD_WEBHOOK_SECRET),
        ),
    ),
    "url not a url": BadSetting(
        ("check",), ("EVENTSYNC_BOOKSTACK_URL",), env=(("EVENTSYNC_BOOKSTACK_URL", "wiki here"),)
    ),
    "url not http": BadSetting(
        ("check",),
        ("EVENTSYNC_BOOKSTACK_URL",),
        env=(("EVENTSYNC_BOOKSTACK_URL", "ftp://wiki.example.com"),),
    ),
    "webhook secret too short": BadSetting(
        ("serve",), ("EVENTSYNC_WEBHOOK_SECRET",), env=(("EVENTSYNC_WEBHOOK_SECRET", "short"),)
    ),
    "log format unknown": BadSetting(
        ("check",), ("EVENTSYNC_LOG_FORMAT",), env=(("EVENTSYNC_LOG_FORMAT", "xml"),)
    ),
    "invalid value in .env": BadSetting(
        ("check",), ("EVENTSYNC_SWEEP_SHARE",), dotenv="EVENTSYNC_SWEEP_SHARE=2\n"
    ),
    "invalid value in toml": BadSetting(
        ("check",), ("EVENTSYNC_POLL_INTERVAL",), toml="poll_interval = -1\n"
    ),
    "database a postgresql url naming no database": BadSetting(
        ("reconcile",),
        ("EVENTSYNC_DATABASE", "names no database"),
        env=(("EVENTSYNC_DATABASE", "postgresql://sync:pw@127.0.0.1:5432"),),
    ),
    "database a postgresql url with a bad port": BadSetting(
        ("status",),
        ("EVENTSYNC_DATABASE", "port"),
        env=(("EVENTSYNC_DATABASE", "postgres://sync:pw@127.0.0.1:99999/wiki"),),
    ),
    "database schema not an identifier": BadSetting(
        ("status",),
        ("EVENTSYNC_DATABASE_SCHEMA",),
        env=(("EVENTSYNC_DATABASE_SCHEMA", "Mirror; DROP"),),
    ),
    "database postgresql that is not running": BadSetting(
        ("status",),
        ("PostgreSQL", "127.0.0.1:1", "***"),
        env=(("EVENTSYNC_DATABASE", "postgresql://sync:hunter2@127.0.0.1:1/wiki"),),
    ),
    "database another url": BadSetting(
        ("status",),
        ("EVENTSYNC_DATABASE", "mysql://"),
        env=(("EVENTSYNC_DATABASE", "mysql://127.0.0.1/wiki"),),
    ),
    "config file missing": BadSetting(("check",), ("nowhere.toml",), toml="-"),
    "toml syntax error": BadSetting(("check",), ("eventsync.toml",), toml="database = \n"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
async def test_bad_setting_stops_with_one_line_and_exit_2(
    cli: Cli, tmp_path: Path, case: BadSetting
) -> None:
    database = tmp_path / "never.db"
    env = settings_for(None, database)
    for key, value in case.env:
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    args: list[str] = []
    if case.dotenv is not None:
        (cli.workdir / ".env").write_text(case.dotenv)
    if case.toml == "-":
        args = ["--config", str(cli.workdir / "nowhere.toml")]
    elif case.toml is not None:
        args = ["--config", str(cli.write_toml(case.toml))]
    result = await cli(*args, *case.command, env=env, timeout=20.0)
    assert_one_line_error(result, *case.names)
    assert result.stdout == ""
    assert not database.exists()
    # A URL taken for a file name would leave a folder such as "postgresql:" behind.
    assert not [p for p in cli.workdir.iterdir() if p.name.endswith(":")]
    assert "pw@" not in result.output


# ---- check ---------------------------------------------------------------------------------------


async def test_check_passes_for_an_admin_token(cli: Cli, make_fake: FakeFactory) -> None:
    fake = await make_fake()
    result = await cli("check", env=settings_for(fake, log_level="debug"), script=True)
    assert result.code == 0, str(result)
    lines = result.stdout.splitlines()
    assert len(lines) >= 4 and all(line.startswith("ok ") for line in lines), str(result)
    for what in ("reach BookStack", "API token accepted", "audit-log access"):
        assert what in result.stdout
    assert_no_traceback(result)
    assert fake.token_secret not in result.output


async def test_check_reconcile_and_status_on_a_bookstack_without_an_audit_log_api(
    cli: Cli, make_fake: FakeFactory, tmp_path: Path
) -> None:
    """BookStack before v23.08: `check` says so with the version, without failing (it is
    supported); `reconcile` syncs; `status` names the mode rather than a bare 404."""
    fake = await make_fake(audit_log=False)
    env = settings_for(fake, tmp_path / "mirror.db")
    checked = await cli("check", env=env)
    assert checked.code == 0, str(checked)
    assert_no_traceback(checked)
    lines = checked.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], str(checked)
    (warned,) = [line for line in lines if line.startswith("warn")]
    assert "audit-log access" in warned and "no audit-log API" in warned, warned
    assert "v23.08" in warned and "HTTP 404" not in checked.stdout

    synced = await cli("reconcile", env=env, timeout=60.0)
    assert synced.code == 0, str(synced)
    assert "mirror is consistent" in synced.stdout
    assert json.loads((await cli("export", env=env)).stdout) == fake.truth()
    status = await cli("status", env=env)
    assert re.search(r"audit access:\s+NO: this BookStack has no audit-log API", status.stdout)
    assert "v23.08" in status.stdout, status.stdout
    data = json.loads((await cli("status", "--json", env=env)).stdout)
    assert (data["audit_log"], data["audit_access"], data["audit_cursor"]) == (
        "no audit-log API",
        False,
        None,
    )
    # A second run is a plain diff: no "no sync point", no gap.
    again = await cli("reconcile", env=env, timeout=60.0)
    assert again.code == 0, str(again)
    assert "diff sync of everything" not in again.stderr, str(again)


CHECK_FAILURES = {
    # case: (what the FAIL line must mention, exit code)
    "wrong secret": "EVENTSYNC_BOOKSTACK_TOKEN",
    "unknown token id": "EVENTSYNC_BOOKSTACK_TOKEN",
    "user without API access": "Access system API",
    "expired token": "expired",
    "no audit-log access": "Manage app settings",
    "unreachable url": "EVENTSYNC_BOOKSTACK_URL",
}


@pytest.mark.parametrize("case", CHECK_FAILURES.keys())
async def test_check_explains_what_to_fix(
    cli: Cli, make_fake: FakeFactory, make_token: TokenFactory, case: str
) -> None:
    fake = await make_fake(pages=5, books=1)
    secrets = [fake.token_secret]
    env = settings_for(fake, log_level="debug")
    if case == "wrong secret":
        env["EVENTSYNC_BOOKSTACK_TOKEN_SECRET"] = "wrong-secret-for-admin-6d1e8a4c2b"
    elif case == "unknown token id":
        env["EVENTSYNC_BOOKSTACK_TOKEN_ID"] = "no-such-token-id"
    elif case == "user without API access":
        token = await make_token(fake, [p for p in ALL_PERMISSIONS if p != "access-api"])
        env = settings_for(fake, token=token, log_level="debug")
    elif case == "expired token":
        token = await make_token(fake, ALL_PERMISSIONS, expired=True)
        env = settings_for(fake, token=token, log_level="debug")
    elif case == "no audit-log access":
        token = await make_token(fake, [p for p in ALL_PERMISSIONS if p != "settings-manage"])
        env = settings_for(fake, token=token, log_level="debug")
    else:
        env["EVENTSYNC_BOOKSTACK_URL"] = f"http://127.0.0.1:{closed_port()}"
    secrets.append(env["EVENTSYNC_BOOKSTACK_TOKEN_SECRET"])

    result = await cli("check", env=env, timeout=40.0)
    assert result.code != 0, str(result)
    assert_no_traceback(result)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, str(result)
    assert CHECK_FAILURES[case] in failed[0], str(result)
    for secret in secrets:
        assert secret not in result.output, f"a token secret appears in the output of {case}"


# ---- reconcile, export, status, dead letters ---------------------------------------------------


async def test_full_reconcile_then_export_status_and_dead_letters(
    cli: Cli, make_fake: FakeFactory, tmp_path: Path
) -> None:
    fake = await make_fake(pages=30, books=3, seed=1)
    # Some history, so the audit cursor has something to point at.
    await fake.update_page(1, html="<p>edited before the first sync</p>")
    await fake.update_book(2, description="described before the first sync")
    last_activity = max(a.id for a in fake.state.activities if a.committed)
    database = tmp_path / "mirror.db"
    env = settings_for(fake, database)
    fake.reset_requests()

    result = await cli("reconcile", "--full", env=env, timeout=60.0)
    assert result.code == 0, str(result)
    assert_no_traceback(result)
    assert re.search(r"created\s+updated\s+deleted\s+unchanged", result.stdout), result.stdout
    truth = fake.truth()
    rows = summary_rows(result.stdout)
    for kind, (created, updated, deleted, unchanged) in rows.items():
        assert (created, updated, deleted, unchanged) == (len(truth[SECTION_OF[kind]]), 0, 0, 0), (
            kind,
            result.stdout,
        )
    assert api_requests(result.stdout) == len(fake.requests), result.stdout
    assert "mirror is consistent" in result.stdout
    if database_value(database) == str(database):  # a SQLite file
        assert stat.S_IMODE(database.stat().st_mode) == 0o600

    exported = await cli("export", env=env)
    assert exported.code == 0, str(exported)
    assert json.loads(exported.stdout) == truth  # one JSON document, nothing else on stdout

    status_json = await cli("status", "--json", env=env)
    assert status_json.code == 0, str(status_json)
    data = json.loads(status_json.stdout)
    assert data["database"] == redacted(database_value(database))  # no password shown
    assert data["audit_cursor"] == last_activity
    assert data["queue_depth"] == 0
    assert data["dead_letters"] == 0
    assert data["last_full_sync_at"]
    assert data["counts"] == {
        **{kind: len(truth[section]) for kind, section in SECTION_OF.items()},
        "permissions": len(truth["permissions"]),
    }

    status = await cli("status", env=env)
    assert status.code == 0, str(status)
    assert re.search(rf"audit cursor:\s+{last_activity}\b", status.stdout), status.stdout
    assert re.search(r"queue depth:\s+0\b", status.stdout), status.stdout
    assert re.search(r"dead letters:\s+0\b", status.stdout), status.stdout
    assert f"{len(truth['pages'])} pages" in status.stdout

    letters = await cli("dead-letters", "list", env=env)
    assert (letters.code, letters.stdout.strip()) == (0, "no dead letters"), str(letters)
    letters_json = await cli("dead-letters", "list", "--json", env=env)
    assert letters_json.code == 0 and json.loads(letters_json.stdout) == [], str(letters_json)

    # A second full pass finds nothing new; its summary as JSON says so.
    again = await cli("reconcile", "--full", "--json", env=env, timeout=60.0)
    assert again.code == 0, str(again)
    summary = json.loads(again.stdout)
    assert summary["complete"] is True and summary["problems"] == []
    for kind, tally in summary["kinds"].items():
        assert tally["created"] == tally["deleted"] == 0, (kind, tally)
        assert tally["updated"] + tally["unchanged"] == len(truth[SECTION_OF[kind]]), (kind, tally)
    assert summary["requests"] > 0
    if database_value(database) == str(database):  # a SQLite file
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
    for run in (result, exported, status_json, status, letters, again):
        assert fake.token_secret not in run.output
    # Plain words in the text status ("3 shelfs", "2 permissionss" would be typos).
    assert not re.search(r"\b(shelfs|permissionss)\b", status.stdout), status.stdout


async def test_dead_letters_list_on_an_empty_database(cli: Cli, tmp_path: Path) -> None:
    database = tmp_path / "empty.db"
    async with await open_store(database):
        pass
    env = {"EVENTSYNC_DATABASE": database_value(database)}  # no BookStack settings needed
    listed = await cli("dead-letters", "list", env=env)
    assert (listed.code, listed.stdout.strip()) == (0, "no dead letters"), str(listed)
    bare = await cli("dead-letters", env=env)
    assert (bare.code, bare.stdout.strip()) == (0, "no dead letters"), str(bare)
    assert_no_traceback(listed)


@pytest.mark.sqlite_only("a PostgreSQL mirror is created by the first to connect")
@pytest.mark.parametrize(
    "command", [("export",), ("status",), ("status", "--json"), ("dead-letters", "list")]
)
async def test_commands_on_a_missing_database_fail_clearly(
    cli: Cli, tmp_path: Path, command: tuple[str, ...]
) -> None:
    database = tmp_path / "nothing-here.db"
    result = await cli(*command, env={"EVENTSYNC_DATABASE": database_value(database)})
    assert_one_line_error(result, str(database), "does not exist")
    assert result.stdout == ""
    assert not database.exists(), "a read-only command created the database"


async def test_failed_listing_exits_1_and_removes_nothing(
    cli: Cli, make_fake: FakeFactory, tmp_path: Path
) -> None:
    fake = await make_fake(pages=20, books=2, seed=6)
    env = settings_for(fake, tmp_path / "mirror.db")
    first = await cli("reconcile", env=env, timeout=60.0)
    assert first.code == 0, str(first)
    before = json.loads((await cli("export", env=env)).stdout)
    assert before == fake.truth()

    gone = plain_pages(fake)[0]
    await fake.delete_page(gone)
    fake.faults.fail_listings = {"/api/pages"}
    failed = await cli("reconcile", "--full", env=env, timeout=80.0)
    assert failed.code == 1, str(failed)
    assert_no_traceback(failed)
    assert "NOT consistent" in failed.stdout, str(failed)
    assert "/api/pages" in failed.stdout, str(failed)
    after = json.loads((await cli("export", env=env)).stdout)
    assert gone in {p["id"] for p in after["pages"]}, "a page was removed after a failed listing"
    assert after == before  # nothing else was touched either

    # Once the listing works again, a plain reconcile catches up: the failed run did not
    # move the audit cursor past the deletion.
    fake.faults.fail_listings = set()
    recovered = await cli("reconcile", env=env, timeout=60.0)
    assert recovered.code == 0, str(recovered)
    assert json.loads((await cli("export", env=env)).stdout) == fake.truth()
