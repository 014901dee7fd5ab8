"""The images' environment: exactly what the Dockerfiles install, and every entry point run from it.

There is no Docker daemon here or in CI, so each Dockerfile's build stage is replayed: its COPY
lines (through .dockerignore's allow-list) fill a build context, ``python -m venv`` makes a fresh
virtualenv, and its ``pip install`` lines, read from the Dockerfile, run unchanged but for
``--no-cache-dir`` (which only stops pip writing its cache: reading the warm cache keeps this to
about half a minute per image). The build context is then deleted, as the runtime stage keeps only
the virtualenv. The entry points the deployment starts run from that virtualenv, in an empty
working directory, with only the variables the container would have (bound to 127.0.0.1 instead
of the image's 0.0.0.0), against Google's Pub/Sub emulator, a real aiosmtpd server and, for the
canary, Dovecot, all on loopback:

- publisher image: its CMD (``python -m publisher``); the reconcile job's command, read from
  terraform/cli_jobs.tf (the job runs this image): reconcile releases a stuck reservation;
- subscriber image: its CMD (``python -m subscriber push``); the pull-mode worker pool's command,
  read from terraform/run.tf; the functions-framework targets of subscriber/function.py;
- canary image: its CMD (``python -m canary``), which is the canary job's command in
  terraform/canary.tf: the canary finds its probe in the mailbox.

The base image's Python is 3.11 (python:3.11-slim-bookworm), as CI's is.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.utils import canonicalize_name

from emulator import RunningEmulator
from emulator.pipeline import PULL_READY_MARKER, ServiceProcess
from emulator.process import free_port
from emulator.smtp import LocalSmtpServer
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus, open_record
from mailpipe.record.sqlite import SqliteRecord
from mailpipe.topology import Topology
from tests.fixtures.imap import Dovecot
from tests.fixtures.pipeline import pipeline_env
from tests.fixtures.terraform import Module, cli_job_command, container_command

REPO = Path(__file__).resolve().parents[2]
IMAGES = ("publisher", "subscriber", "canary")
# What only the test and dev extras bring: none of it may reach an image.
NOT_IN_IMAGES = {"pytest", "hypothesis", "schemathesis", "trustme", "python-hcl2", "ruff", "mypy"}
# Installed by `python -m venv` / the build itself, not by the project's requirements.
TOOLING = {"pip", "setuptools", "wheel", "mailpipe"}
MAIL = {"from": "sender@example.com", "to": ["rcpt@example.org"], "subject": "hi", "text": "hello"}


# ------------------------------------------------------------------------------------------------
# Reading a Dockerfile's build
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerBuild:
    """What a Dockerfile's build stage copies and installs, and the runtime stage's CMD."""

    path: Path
    copies: list[tuple[list[str], str]]  # (sources, destination), in order
    pip_installs: list[list[str]]  # the arguments after `pip install`
    cmd: list[str]


def _logical_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined, comments and blank lines dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def read_dockerfile(path: Path) -> DockerBuild:
    stages: list[list[tuple[str, str]]] = []
    for line in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{path}: an instruction before FROM"
        stages[-1].append((keyword.upper(), rest.strip()))
    assert len(stages) >= 2, f"{path}: expected a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    copies: list[tuple[list[str], str]] = []
    installs: list[list[str]] = []
    for keyword, rest in build:
        if keyword == "COPY":
            words = rest.split()
            assert not words[0].startswith("--"), f"{path}: COPY flags are not replayed: {rest}"
            copies.append((words[:-1], words[-1]))
        elif keyword == "RUN":
            words = shlex.split(rest)
            if words[:3] == ["python", "-m", "venv"]:
                continue  # the fixture makes the virtualenv
            assert words[:2] == ["pip", "install"], (
                f"{path}: this test replays only `pip install` and `python -m venv`: {rest}"
            )
            installs.append(words[2:])
    assert installs, f"{path}: its build stage installs nothing"
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime, (
        f"{path}: the runtime stage must take the build stage's virtualenv, and only that"
    )
    [cmd] = [json.loads(rest) for keyword, rest in runtime if keyword == "CMD"]
    return DockerBuild(path, copies, installs, cmd)


def _dockerignore_allowed() -> set[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything (an allow-list)"
    return {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}


IGNORED_IN_CONTEXT = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache"
)


def fill_build_context(build: DockerBuild, context: Path) -> None:
    """Copy what the build stage's COPY lines take, as docker would, refusing what
    .dockerignore keeps out of the context (docker build would not see it)."""
    allowed = _dockerignore_allowed()
    for sources, destination in build.copies:
        target = context / destination
        for source in sources:
            name = source.rstrip("/")
            assert name in allowed, f"{build.path}: COPY {source}, but .dockerignore excludes it"
            origin = REPO / name
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=IGNORED_IN_CONTEXT, dirs_exist_ok=True)
            else:
                assert destination.endswith("/"), f"{build.path}: COPY {source} {destination}"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)


# ------------------------------------------------------------------------------------------------
# The image environments
# ------------------------------------------------------------------------------------------------


@dataclass
class ImageEnvironment:
    """A virtualenv with exactly what one image installs, and how to run things from it."""

    name: str
    build: DockerBuild
    venv: Path
    workdir: Path  # empty, like the image's WORKDIR /app
    started: list[ServiceProcess] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def argv(self, command: list[str]) -> list[str]:
        """A container command with its program taken from the virtualenv (as PATH does there)."""
        program = self.venv / "bin" / command[0]
        assert program.exists(), f"{command[0]} is not in the {self.name} image's /opt/venv/bin"
        return [str(program), *command[1:]]

    def environ(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The container's environment: nothing inherited from this test process."""
        return {
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "MAILPIPE_HTTP_HOST": "127.0.0.1",  # the image says 0.0.0.0; tests stay on loopback
            **extra,
        }

    def run(
        self, command: list[str], env: Mapping[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command),
            env=self.environ(env),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str],
        *,
        health_url: str | None = None,
        ready_marker: str | None = None,
    ) -> ServiceProcess:
        log_path = self.workdir.parent / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            self.argv(command),
            env=self.environ(env),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        service = ServiceProcess(name, process, log_path, health_url, ready_marker, log)
        self.started.append(service)
        service.wait_healthy(timeout=60)
        return service


def build_image_environment(name: str, root: Path) -> ImageEnvironment:
    build = read_dockerfile(REPO / name / "Dockerfile")
    context, venv, workdir = root / "context", root / "venv", root / "app"
    workdir.mkdir(parents=True)
    fill_build_context(build, context)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_NO_CACHE_DIR", "PYTHONPATH")}
    for arguments in build.pip_installs:
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        result = subprocess.run(
            [*pip, *(a for a in arguments if a != "--no-cache-dir")],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, (
            f"`pip install {' '.join(arguments)}` of {build.path} failed:\n{result.stderr[-3000:]}"
        )
    shutil.rmtree(context)  # the runtime stage keeps /opt/venv only
    return ImageEnvironment(name, build, venv, workdir)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ImageEnvironment]]:
    """``images(name)``: that image's environment. All are built at the first call, side by
    side (pip spends most of its time waiting for the package index)."""
    built: dict[str, ImageEnvironment] = {}

    def get(name: str) -> ImageEnvironment:
        if not built:
            roots = {image: tmp_path_factory.mktemp(f"image-{image}") for image in IMAGES}
            with ThreadPoolExecutor(len(IMAGES)) as pool:
                futures = {i: pool.submit(build_image_environment, i, roots[i]) for i in IMAGES}
                built.update({image: future.result() for image, future in futures.items()})
        return built[name]

    yield get
    for image in built.values():
        for service in image.started:
            service.stop()


@contextmanager
def service(
    image: ImageEnvironment,
    name: str,
    command: list[str],
    env: Mapping[str, str],
    **readiness: str,
) -> Iterator[ServiceProcess]:
    started = image.start(name, command, env, **readiness)
    try:
        yield started
    finally:
        started.stop()


def http_service(
    image: ImageEnvironment, name: str, env: Mapping[str, str], port: int
) -> AbstractContextManager[ServiceProcess]:
    """The image's own CMD serving on ``port`` (PORT, as Cloud Run sets it), ready once its
    /healthz answers."""
    return service(
        image,
        name,
        image.build.cmd,
        {**env, "PORT": str(port)},
        health_url=f"http://127.0.0.1:{port}/healthz",
    )


@pytest.fixture(scope="module")
def terraform() -> Module:
    return Module()


def post_mail(publisher_url: str, mail: Mapping[str, Any] = MAIL) -> dict[str, Any]:
    response = httpx.post(f"{publisher_url}/v1/messages", json=dict(mail), timeout=30)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def wait_for_status(publisher_url: str, mail_id: str, wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{publisher_url}/v1/messages/{mail_id}", timeout=10)
        if response.status_code == 200:
            record = response.json()
            if record["status"] == wanted:
                return record
        time.sleep(0.1)
    raise AssertionError(f"mail {mail_id} never reached {wanted}; last record: {record}")


@pytest.fixture
def stack_env(
    pubsub_emulator: RunningEmulator, pubsub_project: str, tmp_path: Path
) -> Callable[[Topology, int], dict[str, str]]:
    """``stack_env(topology, smtp_port)``: the services' variables for a topology (local mode)."""

    def make(topology: Topology, smtp_port: int) -> dict[str, str]:
        record = tmp_path / "record.sqlite3"
        return pipeline_env(pubsub_emulator, pubsub_project, topology, record, smtp_port)

    return make


# ------------------------------------------------------------------------------------------------
# What is installed
# ------------------------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.parametrize("name", IMAGES)
def test_image_installs_only_runtime_dependencies_at_their_pinned_versions(
    images: Callable[[str], ImageEnvironment], name: str
) -> None:
    image = images(name)
    listing = image.run(["python", "-m", "pip", "list", "--format", "json"], {})
    assert listing.returncode == 0, listing.stderr
    installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listing.stdout)}
    pins = _pins()
    unpinned = sorted(d for d in installed if d not in pins and d not in TOOLING)
    drifted = sorted(
        f"{d} {v} (pinned {pins[d]})" for d, v in installed.items() if d in pins and pins[d] != v
    )
    assert unpinned == [], f"installed without a pin in constraints.txt: {unpinned}"
    assert drifted == [], f"installed at other versions than constraints.txt says: {drifted}"
    assert not NOT_IN_IMAGES & set(installed), "test or dev tools got into the image"
    check = image.run(["python", "-m", "pip", "check"], {})
    assert check.returncode == 0, check.stdout + check.stderr


IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
failed = {}
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # runs the service
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""


@pytest.mark.parametrize("name", IMAGES)
def test_every_module_in_the_image_imports(
    images: Callable[[str], ImageEnvironment], name: str
) -> None:
    image = images(name)
    # Every package the Dockerfile copies in (the publisher image also carries ops/, canary/ and
    # client/; the canary image, client/).
    packages = [d.rstrip("/") for _, d in image.build.copies if d.endswith("/") and d != "./"]
    assert "mailpipe" in packages and name in packages, packages
    result = image.run(["python", "-c", IMPORT_EVERY_MODULE, *packages], {})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}, f"modules of the {name} image that do not import"


def test_the_cli_starts_in_the_publisher_image(
    images: Callable[[str], ImageEnvironment],
) -> None:
    result = images("publisher").run(["mailpipe", "--help"], {})
    assert result.returncode == 0, result.stderr
    assert "canary" in result.stdout and "dlq" in result.stdout


# ------------------------------------------------------------------------------------------------
# The entry points
# ------------------------------------------------------------------------------------------------


def test_push_images_take_a_mail_from_http_to_smtp(
    images: Callable[[str], ImageEnvironment],
    apply_mail_topology: Callable[..., Topology],
    stack_env: Callable[[Topology, int], dict[str, str]],
    smtp_server: LocalSmtpServer,
) -> None:
    publisher, subscriber = images("publisher"), images("subscriber")
    publisher_port, subscriber_port = free_port(), free_port()
    topology = apply_mail_topology(push_endpoint=f"http://127.0.0.1:{subscriber_port}/")
    env = stack_env(topology, smtp_server.port)
    publisher_url = f"http://127.0.0.1:{publisher_port}"

    with (
        http_service(publisher, "publisher", env, publisher_port),
        http_service(subscriber, "subscriber-push", env, subscriber_port),
    ):
        accepted = post_mail(publisher_url)
        [received] = smtp_server.wait_for(1, timeout=60)
        record = wait_for_status(publisher_url, accepted["mail_id"], "delivered")

    assert publisher.build.cmd == ["python", "-m", "publisher"]
    assert subscriber.build.cmd == ["python", "-m", "subscriber", "push"]
    assert received.message["Message-ID"] == f"<{accepted['mail_id']}@test.mailpipe.local>"
    assert record["attempts"][-1]["outcome"] == "delivered"


def test_pull_worker_of_the_subscriber_image_delivers_a_mail(
    images: Callable[[str], ImageEnvironment],
    terraform: Module,
    mail_topology: Topology,
    stack_env: Callable[[Topology, int], dict[str, str]],
    smtp_server: LocalSmtpServer,
) -> None:
    command = container_command(terraform.resource("google_cloud_run_v2_worker_pool", "subscriber"))
    assert command == ["python", "-m", "subscriber", "pull"]
    publisher, subscriber = images("publisher"), images("subscriber")
    publisher_port = free_port()
    env = stack_env(mail_topology, smtp_server.port)
    publisher_url = f"http://127.0.0.1:{publisher_port}"

    with (
        http_service(publisher, "publisher", env, publisher_port),
        service(subscriber, "subscriber-pull", command, env, ready_marker=PULL_READY_MARKER),
    ):
        accepted = post_mail(publisher_url)
        [received] = smtp_server.wait_for(1, timeout=60)
        wait_for_status(publisher_url, accepted["mail_id"], "delivered")

    assert received.message["Message-ID"] == f"<{accepted['mail_id']}@test.mailpipe.local>"


def _push_body(mail: QueuedMail, message_id: str, **attributes: str) -> dict[str, Any]:
    data, mail_attributes = mail.to_pubsub()
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": {**mail_attributes, **attributes},
            "messageId": message_id,
            "publishTime": "2026-11-23T10:00:00Z",
        },
        "subscription": "projects/mailpipe-test/subscriptions/image-test",
    }


def _queued(subject: str) -> QueuedMail:
    return QueuedMail.accept(MailRequest.model_validate({**MAIL, "subject": subject}))


def test_function_targets_of_the_subscriber_image(
    images: Callable[[str], ImageEnvironment],
    mail_topology: Topology,
    stack_env: Callable[[Topology, int], dict[str, str]],
    smtp_server: LocalSmtpServer,
) -> None:
    subscriber = images("subscriber")
    located = subscriber.run(
        ["python", "-c", "import subscriber, pathlib; print(pathlib.Path(subscriber.__file__))"],
        {},
    )
    source = Path(located.stdout.strip()).with_name("function.py")
    assert source.is_relative_to(subscriber.venv), "function.py must be the installed one"
    env = stack_env(mail_topology, smtp_server.port)
    record = open_record(env["MAILPIPE_RECORD"])
    delivered, dead = _queued("via the deliver target"), _queued("dead-lettered")
    record.mark_queued(dead.mail_id, message_id="2", trace_id=None, accepted_at=dead.accepted_at)

    answers = {}
    for target, body in (
        ("deliver", _push_body(delivered, "1")),
        ("dead_letter", _push_body(dead, "2", CloudPubSubDeadLetterSourceDeliveryCount="5")),
    ):
        port = free_port()
        command = ["functions-framework", "--source", str(source), "--target", target]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        # The functions answer every path: readiness is a refused (400) empty POST.
        with service(subscriber, f"function-{target}", command, env) as started:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 60
            while True:
                try:
                    answers[target] = httpx.post(url, json=body, timeout=30).status_code
                    break
                except httpx.TransportError:
                    assert started.process.poll() is None, started.log_tail()
                    assert time.monotonic() < deadline, started.log_tail()
                    time.sleep(0.2)

    assert answers == {"deliver": 204, "dead_letter": 204}
    [received] = smtp_server.wait_for(1)
    assert received.message["Subject"] == "via the deliver target"
    marked = record.get(dead.mail_id)
    assert marked is not None and marked.status == MailStatus.DEAD_LETTERED
    record.close()


def test_canary_job_of_the_canary_image_finds_its_probe_in_the_mailbox(
    images: Callable[[str], ImageEnvironment],
    terraform: Module,
    apply_mail_topology: Callable[..., Topology],
    stack_env: Callable[[Topology, int], dict[str, str]],
    dovecot: Dovecot,
) -> None:
    command = container_command(terraform.resource("google_cloud_run_v2_job", "canary"))
    job_image = terraform.resource("google_cloud_run_v2_job", "canary")["template"][0]["template"]
    assert job_image[0]["containers"][0]["image"] == "${var.canary_image}"
    publisher, subscriber, canary = images("publisher"), images("subscriber"), images("canary")
    assert command == canary.build.cmd
    publisher_port, subscriber_port = free_port(), free_port()
    topology = apply_mail_topology(push_endpoint=f"http://127.0.0.1:{subscriber_port}/")
    publisher_url = f"http://127.0.0.1:{publisher_port}"

    with LocalSmtpServer(maildir=dovecot.maildir) as relay:
        env = stack_env(topology, relay.port)
        with (
            http_service(publisher, "publisher", env, publisher_port),
            http_service(subscriber, "subscriber-push", env, subscriber_port),
        ):
            result = canary.run(
                command,
                {
                    "MAILPIPE_URL": publisher_url,
                    "MAILPIPE_CANARY_PUBLISHER_AUTH": "none",
                    **dovecot.canary_env(),
                    "MAILPIPE_CANARY_TO": "canary@example.org",
                    "MAILPIPE_CANARY_DEADLINE": "60",
                    "MAILPIPE_CANARY_POLL_INTERVAL": "0.2",
                    "MAILPIPE_MESSAGE_ID_DOMAIN": env["MAILPIPE_MESSAGE_ID_DOMAIN"],
                },
            )

    assert command == ["python", "-m", "canary"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^ok probe \S+ visible in INBOX", result.stdout, re.MULTILINE), result.stdout


def test_reconcile_job_of_the_publisher_image_releases_a_stuck_reservation(
    images: Callable[[str], ImageEnvironment], terraform: Module, tmp_path: Path
) -> None:
    job = terraform.resource("google_cloud_run_v2_job", "cli_job")
    command = cli_job_command(terraform, "reconcile")
    assert job["template"][0]["template"][0]["containers"][0]["image"] == (
        "${coalesce(each.value.image, var.publisher_image)}"
    )
    assert (
        terraform.locals["cli_job_declarations"]["reconcile"]["image"] == "${var.reconcile.image}"
    )
    # A publisher that died between reserving an idempotency key and publishing, an hour ago.
    url = f"sqlite:///{tmp_path / 'record.sqlite3'}"
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    seed = SqliteRecord(tmp_path / "record.sqlite3", clock=lambda: an_hour_ago)
    seed.reserve(
        mail_id="crashed-publisher",
        accepted_at=an_hour_ago,
        recipient_domains=(),
        idempotency_key="k",
    )
    seed.close()

    result = images("publisher").run(
        command,
        {
            "GOOGLE_CLOUD_PROJECT": "mailpipe-test",
            "MAILPIPE_RECORD": url,
            "CLOUD_RUN_JOB": "mailpipe-reconcile",  # set by Cloud Run in a job
        },
    )

    assert command == ["mailpipe", "reconcile", "--fix"]
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["mail_id"] == "crashed-publisher" and lines[0]["action"] == "released"
    assert lines[-1]["message"] == "reconcile finished"
    record = open_record(url)
    assert record.get("crashed-publisher") is None, "the key was not released"
    record.close()
