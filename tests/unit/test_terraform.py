"""Checks of the GCP deployment (terraform/) and the Dockerfiles that need no Google Cloud.

`terraform init/validate/plan` need the google providers from the registry. Where `terraform init`
reaches it, `terraform validate` runs for real; where it cannot (this machine, many CI runners) that
test is skipped with the reason, and these check what can be checked without it:

- every .tf file parses (python-hcl2) and every google_* argument/block exists in the provider
  schema (../shared/tools/tf-schema-check, google 8.7.0: the team's tool, beside the repository in
  CI; a clone without it skips that test and says so, CI fails without it);
- checkov finds no failed check, and every skip carries a justification;
- the wiring that breaks a deployment silently when wrong: dead-letter IAM for the Pub/Sub service
  agent, OIDC on push, pull mode's grants, no public access, the timeout budget, the canary's VPC
  egress, alert policies, the reconcile job, the services' env names;
- expressions evaluated by a real `terraform console` (locals and variables only, no provider
  needed) when the binary exists: the topology (the same declaration as the emulator's), variable
  validations, the timeout-budget preconditions, the alerts' PromQL.

Nothing here talks to Google Cloud; terraform and checkov run with their network features off,
except the one `terraform init` that tries the provider registry.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

import mailpipe.record.firestore as firestore_record_module
from mailpipe.record.firestore import FirestoreRecord
from mailpipe.serving import SERVER_THREADS
from mailpipe.topology import Topology, default_topology_path, duration_seconds, load_topology
from subscriber.config import SmtpConfig
from tests.fixtures.terraform import (
    Module,
    cli_job_command,
    container_command,
    dynamic_block,
    parse_hcl,
    strings,
)

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
EXAMPLE = TERRAFORM / "examples" / "basic"
TF_SCHEMA_CHECK = REPO.parent / "shared" / "tools" / "tf-schema-check"
CHECKOV_INSTALL = "python3 -m venv .venv-tools && .venv-tools/bin/pip install checkov"

# Keep terraform and checkov off the network: no version checkpoint, no Prisma Cloud download.
OFFLINE_ENV = {
    **os.environ,
    "CHECKPOINT_DISABLE": "1",
    "TF_IN_AUTOMATION": "1",
    "TF_CLI_CONFIG_FILE": os.devnull,
}

PUBLIC_MEMBERS = ("allUsers", "allAuthenticatedUsers")

# Set by other branches of issue 15 in mailpipe/config.py; Terraform already wires them. Once those
# branches are merged every name here is read by config.py and this set can go.
_parse = parse_hcl
_dynamic = dynamic_block
_strings = strings


@pytest.fixture(scope="module")
def module() -> Module:
    return Module(TERRAFORM)


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load_topology()


def _terraform() -> str | None:
    return shutil.which("terraform")


def _run_terraform(
    *args: str, cwd: Path | None = None, timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    """`terraform ARGS` offline (the caller has skipped when the binary is missing)."""
    terraform = _terraform()
    assert terraform is not None
    return subprocess.run(
        [terraform, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=OFFLINE_ENV,
    )


# ------------------------------------------------------------------------------------------------
# Syntax and schema
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(TERRAFORM.rglob("*.tf")), ids=lambda p: str(p.relative_to(TERRAFORM))
)
def test_every_tf_file_parses(path: Path) -> None:
    assert _parse(path), f"{path} parsed to nothing"


def _team_tool(path: Path) -> Path:
    """A tool from ../shared, which CI and the team's machines have and a user's clone does not.

    Absent: skipped with the reason (visible in the summary, `-ra`); in CI (env CI set) absent is a
    failure, since CI is given ../shared and a check that silently stops running is worse.
    """
    if path.is_file():
        return path
    message = (
        f"{path.name} not found at {path}: it is a team tool from ../shared, beside the "
        "repository in CI and on the team's machines"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must provide ../shared", pytrace=False)
    pytest.skip(f"{message}; not in this clone, so not checked here")


def test_every_google_argument_and_block_exists_in_the_provider_schema() -> None:
    checker = _team_tool(TF_SCHEMA_CHECK)
    result = subprocess.run(  # the checker needs python-hcl2, which this interpreter has
        [sys.executable, str(checker), str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"tf-schema-check found problems:\n{result.stdout}{result.stderr}"
    )
    assert "0 problem(s)" in result.stdout


# `terraform init` could not reach the provider registry (no network, DNS, proxy, firewall).
REGISTRY_UNREACHABLE = re.compile(
    r"could not connect to|failed to request discovery document|Failed to query available "
    r"provider packages|no such host|i/o timeout|connection refused|TLS handshake timeout",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def initialized_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """terraform/ copied (with mailpipe/topology.json beside it) and `terraform init`-ed in the
    example and the root module; skips the module's tests when the registry is out of reach."""
    terraform = _terraform()
    if terraform is None:
        pytest.skip("terraform binary not found: `terraform validate` not run")
    root = tmp_path_factory.mktemp("tf-validate")
    shutil.copytree(TERRAFORM, root / "terraform", ignore=shutil.ignore_patterns(".terraform*"))
    (root / "mailpipe").mkdir()
    shutil.copy(default_topology_path(), root / "mailpipe" / "topology.json")
    cache = root / "plugin-cache"
    cache.mkdir()
    env = {**OFFLINE_ENV, "TF_PLUGIN_CACHE_DIR": str(cache)}
    for directory in (root / "terraform", root / "terraform" / "examples" / "basic"):
        try:
            result = subprocess.run(
                [terraform, "init", "-backend=false", "-input=false", "-no-color"],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
                env=env,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("`terraform init` did not reach the provider registry within 180 s")
        output = result.stdout + result.stderr
        if result.returncode != 0 and REGISTRY_UNREACHABLE.search(output):
            reason = " ".join(
                line.strip() for line in output.splitlines() if REGISTRY_UNREACHABLE.search(line)
            )
            pytest.skip(
                "`terraform init` cannot reach the provider registry, so `terraform validate` "
                f"cannot run here: {reason}"
            )
        assert result.returncode == 0, f"`terraform init` in {directory.name} failed:\n{output}"
    return root


@pytest.mark.parametrize("where", ["terraform", "terraform/examples/basic"])
def test_terraform_validate_with_the_real_providers(initialized_copy: Path, where: str) -> None:
    result = _run_terraform(
        "validate", "-json", "-no-color", cwd=initialized_copy / where, timeout=180
    )
    report = json.loads(result.stdout)
    problems = [
        f"{d['severity']}: {d['summary']} {d.get('detail', '')} "
        f"({d.get('range', {}).get('filename')})"
        for d in report.get("diagnostics", [])
    ]
    assert report["valid"], "terraform validate:\n" + "\n".join(problems)


def test_provider_range_is_bounded_and_admits_the_checked_schema(module: Module) -> None:
    terraform = module.by_file["versions.tf"]["terraform"][0]
    google = terraform["required_providers"][0]["google"]
    assert google["source"] == "hashicorp/google"
    spec = SpecifierSet(google["version"].replace(" ", ""))
    assert "8.7.0" in spec, "the range must admit google 8.7 (the schema tf-schema-check uses)"
    assert any(s.operator in ("<", "<=", "~=") for s in spec), "the range needs an upper bound"
    assert "99.0.0" not in spec


# ------------------------------------------------------------------------------------------------
# checkov
# ------------------------------------------------------------------------------------------------


def _checkov() -> str:
    for candidate in (REPO / ".venv-tools" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    # `./dev test` (and so CI) installs it; a bare `pytest` in a fresh clone skips and says how.
    message = f"checkov is not installed; from the repository root run: {CHECKOV_INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _run_checkov(*targets: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            _checkov(),
            *targets,
            "--skip-download",  # offline: no guidelines or policies from Prisma Cloud
            "--output",
            "json",
            "--soft-fail",  # judge the JSON, not the exit code
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=OFFLINE_ENV,
        cwd=REPO,
    )
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


@pytest.fixture(scope="module")
def checkov_results() -> list[dict[str, Any]]:
    # Two runs: checkov mixes up its JSON when one run covers several directories and frameworks.
    return [
        *_run_checkov("--directory", str(TERRAFORM), "--framework", "terraform"),
        *_run_checkov(
            "--file",
            str(REPO / "publisher" / "Dockerfile"),
            "--file",
            str(REPO / "subscriber" / "Dockerfile"),
            "--framework",
            "dockerfile",
        ),
    ]


def test_checkov_finds_no_failed_check(checkov_results: list[dict[str, Any]]) -> None:
    frameworks = {r["check_type"] for r in checkov_results}
    assert {"terraform", "dockerfile"} <= frameworks, f"checkov scanned only {frameworks}"
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']}): "
        f"{c['check_name']}"
        for report in checkov_results
        for c in report["results"]["failed_checks"]
    ]
    assert failed == [], "checkov failed checks:\n" + "\n".join(failed)
    passed = sum(len(r["results"]["passed_checks"]) for r in checkov_results)
    assert passed > 0, "checkov ran no check at all"


def test_every_checkov_skip_is_justified(checkov_results: list[dict[str, Any]]) -> None:
    skipped = [c for report in checkov_results for c in report["results"]["skipped_checks"]]
    unjustified = [
        f"{c['check_id']} {c['resource']}"
        for c in skipped
        if len((c.get("check_result", {}).get("suppress_comment") or "").strip()) < 20
    ]
    assert unjustified == [], f"skips without a reason (#checkov:skip=ID:reason): {unjustified}"


# ------------------------------------------------------------------------------------------------
# One topology: Terraform reads the emulator's declaration
# ------------------------------------------------------------------------------------------------

DECLARATION_READ = re.compile(r'jsondecode\(file\("\$\{path\.module\}/([^"]+)"\)\)')


def test_terraform_reads_the_packaged_topology_declaration(module: Module) -> None:
    reads = DECLARATION_READ.findall(module.text)
    assert len(reads) == 1, f"the declaration must be read exactly once, found {reads}"
    assert (TERRAFORM / reads[0]).resolve() == default_topology_path().resolve()
    assert module.by_file["topology.tf"]["locals"][0]["topology"].startswith("${jsondecode(file(")


def test_topics_and_subscriptions_are_for_each_over_the_declaration(
    module: Module, topology: Topology
) -> None:
    topics = module.of_type("google_pubsub_topic")
    subscriptions = module.of_type("google_pubsub_subscription")
    # Beside the declaration's: only the integrators' webhooks (var.event_webhooks) and the
    # dead-letter topic and subscription of those webhooks (events.tf).
    assert sorted(topics) == ["event_webhook_dead_letter", "topic"]
    assert sorted(subscriptions) == ["event_webhook", "event_webhook_dead_letter", "subscription"]
    assert topics["topic"]["for_each"] == "${local.topics}"
    assert topics["topic"]["name"] == "${each.value.name}"
    sub = subscriptions["subscription"]
    assert sub["for_each"] == "${local.subscriptions}"
    assert sub["name"] == "${each.value.name}"
    assert sub["ack_deadline_seconds"] == "${each.value.ack_deadline_seconds}"
    assert sub["topic"] == "${google_pubsub_topic.topic[each.value.topic].id}"
    retry = _dynamic(sub, "retry_policy")["content"][0]
    assert retry == {
        "minimum_backoff": "${retry_policy.value.minimum_backoff}",
        "maximum_backoff": "${retry_policy.value.maximum_backoff}",
    }
    # No second list: no resource name from the declaration is written anywhere in terraform/.
    names = [t.name for t in topology.topics.values()] + [
        s.name for s in topology.subscriptions.values()
    ]
    for name in names:
        assert f'"{name}"' not in module.text, f"{name!r} is hard-coded in terraform/"


def _console(expression: str, tmp_path: Path) -> Any:
    """Evaluate an expression over topology.tf's locals with a real `terraform console`.

    topology.tf holds locals only, so a copy of it next to a link to mailpipe/ is a complete module
    that needs no provider and no `terraform init`.
    """
    terraform = _terraform()
    if terraform is None:
        pytest.skip("terraform binary not found: topology.tf not evaluated (HCL checks still ran)")
    (tmp_path / "terraform").mkdir()
    shutil.copy(TERRAFORM / "topology.tf", tmp_path / "terraform" / "topology.tf")
    (tmp_path / "mailpipe").symlink_to(REPO / "mailpipe", target_is_directory=True)
    result = subprocess.run(
        [terraform, "console"],
        input=f"jsonencode({expression})\n",
        capture_output=True,
        text=True,
        cwd=tmp_path / "terraform",
        timeout=120,
        check=False,
        env=OFFLINE_ENV,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(json.loads(result.stdout.strip()))


# A complete deployment's variables, for evaluating expressions with `terraform console`.
BASE_TFVARS: dict[str, Any] = {
    "project_id": "mailpipe-prod-123",
    "region": "europe-west1",
    "publisher_image": "europe-west1-docker.pkg.dev/mailpipe-prod-123/mailpipe/publisher:v1",
    "subscriber_image": "europe-west1-docker.pkg.dev/mailpipe-prod-123/mailpipe/subscriber:v1",
    "smtp_host": "smtp.example.com",
    "message_id_domain": "mail.example.com",
    "allowed_sender_domains": ["mail.example.com"],
}

LOCAL_REFERENCE = re.compile(r"\blocal\.([a-z_][a-z0-9_]*)")


def _is_expression(value: str) -> bool:
    """True for python-hcl2's form of a whole expression, ``${...}``; False for a template such
    as ``${var.x}s`` or ``firestore://${var.y}``."""
    if not value.startswith("${"):
        return False
    depth = 0
    for index, char in enumerate(value[1:], start=1):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return index == len(value) - 1
    return False


def _hcl(value: Any) -> str:
    """A parsed value written back as HCL."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        return value[2:-1] if _is_expression(value) else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_hcl(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_hcl(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as HCL")


def _needed_locals(
    module: Module, expressions: Mapping[str, str], stubs: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The module's locals the expressions use, directly or through other locals; a local named
    in ``stubs`` is that HCL expression instead (for a local that reads a resource)."""
    needed: dict[str, Any] = {}
    pending = [name for text in expressions.values() for name in LOCAL_REFERENCE.findall(text)]
    while pending:
        name = pending.pop()
        if name in needed or name == "probe":
            continue
        assert name in module.locals, f"local.{name} is not defined in terraform/"
        needed[name] = "${" + stubs[name] + "}" if stubs and name in stubs else module.locals[name]
        pending.extend(LOCAL_REFERENCE.findall(json.dumps(needed[name])))
    return needed


def _evaluate(
    module: Module,
    tmp_path: Path,
    expressions: Mapping[str, str],
    tfvars: Mapping[str, Any] | None = None,
    stubs: Mapping[str, str] | None = None,
) -> tuple[bool, Any]:
    """Evaluate HCL expressions with a real `terraform console`, over variables.tf (its types,
    defaults and validations), topology.tf and the locals they use: ``(True, {name: value})``, or
    ``(False, terraform's error text)`` when a variable is refused or an expression fails.
    The locals must not depend on resources (those need the providers): ``stubs`` stands in for
    those that do (local name => HCL expression)."""
    terraform = _terraform()
    if terraform is None:
        pytest.skip("terraform binary not found: expressions not evaluated (HCL checks still ran)")
    directory = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}"
    (directory / "terraform").mkdir(parents=True)
    (directory / "mailpipe").symlink_to(REPO / "mailpipe", target_is_directory=True)
    for name in ("variables.tf", "topology.tf"):
        shutil.copy(TERRAFORM / name, directory / "terraform" / name)
    topology_locals = set(module.by_file["topology.tf"]["locals"][0])
    needed = {
        k: v
        for k, v in _needed_locals(module, expressions, stubs).items()
        if k not in topology_locals
    }
    lines = [f"  {name} = {_hcl(value)}" for name, value in needed.items()]
    lines.append("  probe = {")
    lines += [f"    {json.dumps(key)} = {text}" for key, text in expressions.items()]
    lines.append("  }")
    (directory / "terraform" / "probe.tf").write_text("locals {\n" + "\n".join(lines) + "\n}\n")
    (directory / "terraform" / "probe.auto.tfvars.json").write_text(
        json.dumps({**BASE_TFVARS, **(tfvars or {})})
    )
    result = subprocess.run(
        [terraform, "console"],
        input="jsonencode(local.probe)\n",
        capture_output=True,
        text=True,
        cwd=directory / "terraform",
        timeout=120,
        check=False,
        env=OFFLINE_ENV,
    )
    # A refused variable leaves the console's answer empty (its exit code is 0 all the same).
    errors = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)
    if result.returncode != 0 or not result.stdout.strip() or "Error:" in errors:
        return False, errors
    return True, json.loads(json.loads(result.stdout.strip()))


def test_topology_tf_holds_only_locals(module: Module) -> None:
    assert set(module.by_file["topology.tf"]) == {"locals"}


def test_terraform_evaluates_the_same_topology_as_the_emulator(
    topology: Topology, tmp_path: Path
) -> None:
    evaluated = _console(
        "{topics = local.topics, subscriptions = local.subscriptions,"
        " dead_letter = keys(local.dead_letter_subscriptions),"
        " push = keys(local.push_subscriptions)}",
        tmp_path,
    )
    expected_topics = {
        key: {"name": t.name, "message_retention_duration": t.message_retention_duration}
        for key, t in topology.topics.items()
    }
    expected_subscriptions = {
        key: {
            "name": s.name,
            "topic": s.topic,
            "delivery": s.delivery,
            "push_path": s.push_path,
            "ack_deadline_seconds": s.ack_deadline_seconds,
            "message_retention_duration": s.message_retention_duration,
            "retry_policy": None
            if s.retry_policy is None
            else {
                "minimum_backoff": s.retry_policy.minimum_backoff,
                "maximum_backoff": s.retry_policy.maximum_backoff,
            },
            "dead_letter": None
            if s.dead_letter is None
            else {
                "topic": s.dead_letter.topic,
                "max_delivery_attempts": s.dead_letter.max_delivery_attempts,
            },
        }
        for key, s in topology.subscriptions.items()
    }
    assert evaluated["topics"] == expected_topics
    assert evaluated["subscriptions"] == expected_subscriptions
    assert sorted(evaluated["dead_letter"]) == sorted(
        k for k, s in topology.subscriptions.items() if s.dead_letter
    )
    assert sorted(evaluated["push"]) == sorted(
        k for k, s in topology.subscriptions.items() if s.delivery == "push"
    )


def test_max_delivery_attempts_defaults_to_the_declaration(
    module: Module, topology: Topology
) -> None:
    variable = module.variables["max_delivery_attempts"]
    assert variable.get("default") is None, "a default would make GCP differ from the emulator"
    condition = variable["validation"][0]["condition"]
    assert ">= 5" in condition and "<= 100" in condition
    dead_letter = _dynamic(
        module.resource("google_pubsub_subscription", "subscription"), "dead_letter_policy"
    )["content"][0]
    assert dead_letter["max_delivery_attempts"] == (
        "${coalesce(var.max_delivery_attempts, dead_letter_policy.value.max_delivery_attempts)}"
    )
    for sub in topology.subscriptions.values():
        if sub.dead_letter:
            assert 5 <= sub.dead_letter.max_delivery_attempts <= 100


# ------------------------------------------------------------------------------------------------
# Dead-lettering: the Pub/Sub service agent's grants
# ------------------------------------------------------------------------------------------------


def test_the_pubsub_service_agent_comes_from_service_usage(module: Module) -> None:
    """Not an address built from the project number: Service Usage names (and creates) the agent,
    so a grant never targets an account that does not exist yet."""
    identity = module.resource("google_project_service_identity", "pubsub")
    assert identity["provider"] == "google-beta"
    assert identity["service"] == "pubsub.googleapis.com"
    assert identity["project"] == "${var.project_id}"
    assert (
        module.locals["pubsub_service_agent"] == "${google_project_service_identity.pubsub.member}"
    )
    assert "gcp-sa-pubsub" not in module.text, "the agent's address is built by hand somewhere"
    assert not [key for key in module.data if key[0] == "google_project"], (
        "data.google_project unused"
    )
    # Every grant to the agent goes through that one local.
    for (rtype, name), body in module.resources.items():
        if "_iam_" in rtype and "pubsub_agent" in name:
            assert body["member"] == "${local.pubsub_service_agent}", f"{rtype}.{name}"
    # google-beta is required (the resource exists only there) and configured where apply runs.
    required = module.by_file["versions.tf"]["terraform"][0]["required_providers"][0]
    assert required["google-beta"]["source"] == "hashicorp/google-beta"
    assert required["google-beta"]["version"] == required["google"]["version"]
    example = parse_hcl(EXAMPLE / "main.tf")
    providers = {name for entry in example["provider"] for name in entry}
    assert providers == {"google", "google-beta"}


def _dead_letter_topic_of(body: dict[str, Any]) -> str | None:
    """The dead_letter_topic expression of a subscription's (static or dynamic) policy."""
    for policy in body.get("dead_letter_policy", []):
        return str(policy["dead_letter_topic"])
    for entry in body.get("dynamic", []):
        if "dead_letter_policy" in entry:
            return str(entry["dead_letter_policy"]["content"][0]["dead_letter_topic"])
    return None


def test_every_dead_letter_subscription_has_the_service_agent_grants(module: Module) -> None:
    """Pub/Sub forwards to a dead-letter topic only when its service agent may publish there and
    acknowledge on the source subscription (cloud.google.com/pubsub/docs/handling-failures): one
    pair of for_each grants covers every subscription that has a dead_letter_policy."""
    sub = module.resource("google_pubsub_subscription", "subscription")
    policy = _dynamic(sub, "dead_letter_policy")
    assert policy["for_each"] == "${each.value.dead_letter == null ? [] : [each.value.dead_letter]}"
    assert policy["content"][0]["dead_letter_topic"] == (
        "${google_pubsub_topic.topic[dead_letter_policy.value.topic].id}"
    )
    webhook = module.resource("google_pubsub_subscription", "event_webhook")
    assert webhook["dead_letter_policy"][0]["dead_letter_topic"] == (
        "${google_pubsub_topic.event_webhook_dead_letter[0].id}"
    )

    # Every subscription resource with a policy is among the sources, and its topic among the
    # topics; nothing else is.
    sources = module.locals["dead_letter_sources"]
    topics = module.locals["dead_letter_topics"]
    with_policy = {
        name: _dead_letter_topic_of(body)
        for name, body in module.of_type("google_pubsub_subscription").items()
        if _dead_letter_topic_of(body)
    }
    assert sorted(with_policy) == ["event_webhook", "subscription"]
    for needed in (
        "for key, sub in local.dead_letter_subscriptions : key => "
        "google_pubsub_subscription.subscription[key].name",
        'for name, hook in var.event_webhooks : "webhook ${name}" => '
        "google_pubsub_subscription.event_webhook[name].name",
    ):
        assert needed in sources, needed
    assert "sub.dead_letter != null" in module.locals["dead_letter_subscriptions"]
    for needed in (
        "for sub in values(local.dead_letter_subscriptions) : sub.dead_letter.topic",
        "key => google_pubsub_topic.topic[key].name",
        "local.event_webhooks_enabled ? {event_webhooks = "
        "google_pubsub_topic.event_webhook_dead_letter[0].name}",
    ):
        assert needed in topics, needed

    publish = module.resource(
        "google_pubsub_topic_iam_member", "pubsub_agent_publishes_dead_letters"
    )
    assert publish["for_each"] == "${local.dead_letter_topics}"
    assert publish["topic"] == "${each.value}"
    assert publish["role"] == "roles/pubsub.publisher"
    assert publish["member"] == "${local.pubsub_service_agent}"

    ack = module.resource("google_pubsub_subscription_iam_member", "pubsub_agent_acks_dead_letters")
    assert ack["for_each"] == "${local.dead_letter_sources}"
    assert ack["subscription"] == "${each.value}"
    assert ack["role"] == "roles/pubsub.subscriber"
    assert ack["member"] == "${local.pubsub_service_agent}"
    # No second copy of either grant for the webhooks.
    agent_grants = [key for key, body in module.resources.items() if "pubsub_agent" in key[1]]
    assert sorted(name for _, name in agent_grants) == [
        "pubsub_agent_acks_dead_letters",
        "pubsub_agent_mints_event_webhook_tokens",
        "pubsub_agent_mints_invoker_tokens",
        "pubsub_agent_publishes_dead_letters",
    ]


# ------------------------------------------------------------------------------------------------
# Push: OIDC from a dedicated invoker, checked by Cloud Run and by the subscriber
# ------------------------------------------------------------------------------------------------


def test_push_uses_an_oidc_token_from_the_invoker_account(module: Module) -> None:
    push = _dynamic(module.resource("google_pubsub_subscription", "subscription"), "push_config")
    assert push["for_each"] == (
        '${each.value.delivery == "push" && local.push_mode ? [each.value] : []}'
    )
    content = push["content"][0]
    assert content["push_endpoint"] == (
        "${google_cloud_run_v2_service.subscriber[0].uri}${push_config.value.push_path}"
    )
    assert content["oidc_token"] == [
        {
            "service_account_email": "${google_service_account.push_invoker[0].email}",
            "audience": "${local.push_audience}",
        }
    ]

    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    assert subscriber["custom_audiences"] == ["${local.push_audience}"]
    env = module.locals["subscriber_env"]
    assert "MAILPIPE_PUSH_AUDIENCE = local.push_audience" in env
    assert "MAILPIPE_PUSH_SERVICE_ACCOUNT = google_service_account.push_invoker[0].email" in env

    invoker = module.resource(
        "google_cloud_run_v2_service_iam_member", "push_invoker_calls_subscriber"
    )
    assert invoker["role"] == "roles/run.invoker"
    assert invoker["name"] == "${google_cloud_run_v2_service.subscriber[0].name}"
    assert invoker["member"] == "${google_service_account.push_invoker[0].member}"

    token_creator = module.resource(
        "google_service_account_iam_member", "pubsub_agent_mints_invoker_tokens"
    )
    assert token_creator["role"] == "roles/iam.serviceAccountTokenCreator"
    assert token_creator["service_account_id"] == "${google_service_account.push_invoker[0].name}"
    assert token_creator["member"] == "${local.pubsub_service_agent}"

    # The push path exists in push mode only (pull mode has no invoker, no token, no URL).
    for rtype, name in (
        ("google_cloud_run_v2_service", "subscriber"),
        ("google_service_account", "push_invoker"),
        ("google_cloud_run_v2_service_iam_member", "push_invoker_calls_subscriber"),
        ("google_service_account_iam_member", "pubsub_agent_mints_invoker_tokens"),
    ):
        assert module.resource(rtype, name)["count"] == "${local.push_mode ? 1 : 0}", name


def test_the_invoker_account_has_no_other_role(module: Module) -> None:
    grants = [
        f"{rtype}.{name}"
        for (rtype, name), body in module.resources.items()
        if "_iam_" in rtype and "push_invoker" in str(body.get("member", ""))
    ]
    assert grants == ["google_cloud_run_v2_service_iam_member.push_invoker_calls_subscriber"]


# ------------------------------------------------------------------------------------------------
# No public access
# ------------------------------------------------------------------------------------------------


def test_no_iam_grant_to_the_public(module: Module) -> None:
    iam = {key: body for key, body in module.resources.items() if "_iam_" in key[0]}
    assert iam, "no IAM resources found"
    for (rtype, name), body in iam.items():
        for text in _strings(body):
            for public in PUBLIC_MEMBERS:
                assert public not in text, f"{rtype}.{name} grants {public}"
        member = body.get("member", "")
        assert member.startswith("${") or member.startswith("serviceAccount:"), (
            f"{rtype}.{name}: members come from service accounts or validated variables, "
            f"got {member!r}"
        )
    for variable in ("publisher_invokers", "operators"):
        condition = module.variables[variable]["validation"][0]["condition"]
        assert all(p in condition for p in PUBLIC_MEMBERS), f"{variable} must refuse public members"


def test_services_keep_iam_checks_and_the_subscriber_is_internal(module: Module) -> None:
    for name in ("publisher", "subscriber"):
        service = module.resource("google_cloud_run_v2_service", name)
        assert service["invoker_iam_disabled"] is False, f"{name}: IAM invoker check must stay on"
    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    assert subscriber["ingress"] == "INGRESS_TRAFFIC_INTERNAL_ONLY"
    ingress = module.variables["publisher_ingress"]
    assert "INGRESS_TRAFFIC_ALL" in ingress["validation"][0]["condition"]


# ------------------------------------------------------------------------------------------------
# The timeout budget: pool wait < whole delivery < request timeout <= ack deadline
# ------------------------------------------------------------------------------------------------


def _conditions(body: dict[str, Any]) -> list[str]:
    return [p["condition"] for p in body["lifecycle"][0]["precondition"]]


def test_the_timeout_budget_is_enforced_in_both_modes(module: Module, topology: Topology) -> None:
    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    assert subscriber["template"][0]["timeout"] == "${local.subscriber_timeout_seconds}s"
    assert module.locals["subscriber_timeout_seconds"] == (
        "${coalesce(var.subscriber_request_timeout_seconds, local.min_push_ack_deadline)}"
    )
    assert module.variables["subscriber_request_timeout_seconds"].get("default") is None
    push = _conditions(subscriber)
    assert "${local.subscriber_timeout_seconds <= local.min_push_ack_deadline}" in push
    assert "${var.delivery_timeout_seconds < local.subscriber_timeout_seconds}" in push
    assert "${var.smtp_pool_wait_seconds < var.delivery_timeout_seconds}" in push
    assert "${var.smtp_timeout_seconds < local.subscriber_timeout_seconds}" in push
    pull = _conditions(module.resource("google_cloud_run_v2_worker_pool", "subscriber"))
    assert "${var.delivery_timeout_seconds < local.delivery_lease_seconds}" in pull
    assert "${var.smtp_pool_wait_seconds < var.delivery_timeout_seconds}" in pull
    assert module.locals["delivery_lease_seconds"] == (
        '${local.subscriptions["delivery"].ack_deadline_seconds}'
    )
    publisher = _conditions(module.resource("google_cloud_run_v2_service", "publisher"))
    assert "${var.publish_timeout_seconds < var.publisher_scaling.timeout}" in publisher
    assert "${var.publish_timeout_seconds < var.idempotency_reservation_seconds}" in publisher

    # The budget's parts reach the services under the names they read.
    env = module.locals["subscriber_env"]
    assert "MAILPIPE_DELIVERY_TIMEOUT = tostring(var.delivery_timeout_seconds)" in env
    assert "MAILPIPE_SMTP_POOL_WAIT = tostring(var.smtp_pool_wait_seconds)" in env
    assert "MAILPIPE_SMTP_TIMEOUT = tostring(var.smtp_timeout_seconds)" in env
    assert (
        "MAILPIPE_PUBLISH_TIMEOUT = tostring(var.publish_timeout_seconds)"
        in (module.locals["publisher_env"])
    )

    # With the defaults, the numbers themselves:
    request_timeout = min(
        s.ack_deadline_seconds for s in topology.subscriptions.values() if s.delivery == "push"
    )
    defaults = {name: body.get("default") for name, body in module.variables.items()}
    smtp_timeout = defaults["smtp_timeout_seconds"]
    assert smtp_timeout == SmtpConfig().timeout, "Terraform's default must be the service's default"
    assert defaults["smtp_pool_wait_seconds"] < defaults["delivery_timeout_seconds"]
    assert smtp_timeout < defaults["delivery_timeout_seconds"] < request_timeout
    assert request_timeout <= topology.delivery_subscription.ack_deadline_seconds
    assert defaults["publish_timeout_seconds"] < 60  # publisher_scaling's default timeout


# Each precondition of the budget, evaluated by terraform for real: the defaults hold, and each
# broken budget is refused.
BUDGET_CASES = [
    ("defaults", {}, True),
    ("delivery as long as the request", {"delivery_timeout_seconds": 60}, False),
    ("request longer than the ack deadline", {"subscriber_request_timeout_seconds": 90}, False),
    ("pool wait as long as the delivery", {"smtp_pool_wait_seconds": 45}, False),
    ("an SMTP step as long as the request", {"smtp_timeout_seconds": 60}, False),
    ("publish as long as the publisher's request", {"publish_timeout_seconds": 60}, False),
    ("reservation no longer than the publish", {"idempotency_reservation_seconds": 30}, False),
    (
        "a longer request, within the ack deadline",
        {"subscriber_request_timeout_seconds": 60, "delivery_timeout_seconds": 55},
        True,
    ),
    (
        "pull: delivery past the lease",
        {"subscriber_mode": "pull", "delivery_timeout_seconds": 120},
        False,
    ),
    (
        "pull: delivery within the lease",
        {"subscriber_mode": "pull", "delivery_timeout_seconds": 100},
        True,
    ),
]


@pytest.mark.parametrize(
    ("case", "tfvars", "holds"), BUDGET_CASES, ids=[c[0] for c in BUDGET_CASES]
)
def test_the_timeout_budget_evaluated(
    module: Module, tmp_path: Path, case: str, tfvars: dict[str, Any], holds: bool
) -> None:
    publisher = _conditions(module.resource("google_cloud_run_v2_service", "publisher"))
    push = _conditions(module.resource("google_cloud_run_v2_service", "subscriber"))
    pull = _conditions(module.resource("google_cloud_run_v2_worker_pool", "subscriber"))
    # A resource's preconditions count only where it exists (count by mode).
    checks = {
        "publisher": " && ".join(c[2:-1] for c in publisher),
        "push": " && ".join(f"({c[2:-1]})" for c in push),
        "pull": " && ".join(f"({c[2:-1]})" for c in pull),
    }
    ok, result = _evaluate(
        module,
        tmp_path,
        {**checks, "push_mode": "local.push_mode"},
        {**tfvars},
    )
    assert ok, result
    mode = "push" if result["push_mode"] else "pull"
    assert (result["publisher"] and result[mode]) is holds, f"{case}: {result}"


def test_concurrency_fits_the_server_threads(module: Module) -> None:
    threads = SERVER_THREADS
    for service in ("publisher", "subscriber"):
        scaling = module.variables[f"{service}_scaling"]["type"]
        match = re.search(r"concurrency\s*=\s*optional\(number,\s*(\d+)\)", scaling)
        assert match, f"{service}_scaling has no concurrency default"
        assert int(match.group(1)) <= threads, (
            f"{service}: Cloud Run would send more concurrent requests than gunicorn has threads"
        )


def test_retry_policy_is_exponential_within_pubsub_limits(topology: Topology) -> None:
    delivery = topology.delivery_subscription
    assert delivery.retry_policy is not None, (
        "deferred mail must back off, not be re-pushed at once"
    )
    assert delivery.dead_letter is not None
    low = duration_seconds(delivery.retry_policy.minimum_backoff)
    high = duration_seconds(delivery.retry_policy.maximum_backoff)
    assert 0 < low < high <= 600


# ------------------------------------------------------------------------------------------------
# Service configuration
# ------------------------------------------------------------------------------------------------

ENV_NAME = re.compile(r"\b((?:MAILPIPE|GOOGLE)_[A-Z_]+)\s*=")


def _config_source() -> str:
    """The modules that read the services' environment: the shared part and each service's."""
    packages = ("mailpipe", "publisher", "subscriber")
    return "\n".join((REPO / p / "config.py").read_text(encoding="utf-8") for p in packages)


def _env_names(expression: Any) -> set[str]:
    if isinstance(expression, dict):
        return set(expression)
    return set(ENV_NAME.findall(str(expression)))


def test_env_names_are_the_ones_the_services_read(module: Module) -> None:
    config_source = _config_source()
    common = _env_names(module.locals["common_env"])
    publisher = common | _env_names(module.locals["publisher_env"])
    subscriber = common | _env_names(module.locals["subscriber_env"])
    secret = _env_names(module.locals["subscriber_secret_env"])
    assert module.locals["publisher_env"].startswith("${merge(local.common_env, {")
    for name in publisher | subscriber | secret:
        assert f'"{name}"' in config_source, f"{name} is not read by any config.py"
    assert {
        "MAILPIPE_ALLOWED_SENDER_DOMAINS",
        "MAILPIPE_PUBLISH_TIMEOUT",
        "MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS",
        "MAILPIPE_RECONCILE_GRACE_SECONDS",
    } <= publisher
    assert {
        "GOOGLE_CLOUD_PROJECT",
        "MAILPIPE_TOPIC",
        "MAILPIPE_SUBSCRIPTION",
        "MAILPIPE_RECORD",
        "MAILPIPE_TRACES",
        "MAILPIPE_TRACE_SAMPLE_RATIO",
    } <= common
    assert {
        "MAILPIPE_SMTP_HOST",
        "MAILPIPE_SMTP_PORT",
        "MAILPIPE_SMTP_TLS",
        "MAILPIPE_SMTP_USERNAME",
        "MAILPIPE_SMTP_TIMEOUT",
        "MAILPIPE_SMTP_POOL_SIZE",
        "MAILPIPE_MESSAGE_ID_DOMAIN",
        "MAILPIPE_SMTP_POOL_WAIT",
        "MAILPIPE_DELIVERY_TIMEOUT",
        "MAILPIPE_PUSH_AUTH",
        "MAILPIPE_PUSH_AUDIENCE",
        "MAILPIPE_PUSH_SERVICE_ACCOUNT",
    } <= subscriber
    assert secret == {"MAILPIPE_SMTP_PASSWORD"}
    plain_env = str(module.locals["common_env"]) + module.locals["subscriber_env"]
    assert not re.search(r"(?<![A-Z_])PORT\s*=", plain_env), "Cloud Run sets PORT (reserved name)"
    assert module.locals["common_env"]["MAILPIPE_TRACES"] == "gcp"
    assert module.locals["common_env"]["MAILPIPE_RECORD"] == "firestore://${var.firestore_database}"


def test_push_settings_go_to_the_push_endpoint_only(module: Module, tmp_path: Path) -> None:
    """Cloud Run IAM verifies and strips the push token in front of the push service; the pull
    worker receives no pushes and gets no push settings (it would not check them)."""
    env = module.locals["subscriber_env"]
    push_part = env[env.index("local.push_mode ?") : env.index("} : {}")]
    for name in ("MAILPIPE_PUSH_AUTH", "MAILPIPE_PUSH_AUDIENCE", "MAILPIPE_PUSH_SERVICE_ACCOUNT"):
        assert name in push_part, f"{name} must be set in push mode only"
    assert 'MAILPIPE_PUSH_AUTH = "cloud-run"' in push_part
    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    [container] = subscriber["template"][0]["containers"]
    assert "env" not in container, "static env blocks would duplicate local.subscriber_env's names"


def test_smtp_password_only_comes_from_secret_manager(module: Module) -> None:
    for rtype in ("google_cloud_run_v2_service", "google_cloud_run_v2_worker_pool"):
        subscriber = module.resource(rtype, "subscriber")
        container = subscriber["template"][0]["containers"][0]
        plain, secret = container["dynamic"]
        assert plain["env"]["for_each"] == "${local.subscriber_env}", rtype
        assert secret["env"]["for_each"] == "${local.subscriber_secret_env}", rtype
        ref = secret["env"]["content"][0]["value_source"][0]["secret_key_ref"][0]
        assert ref == {"secret": "${env.value.secret}", "version": "${env.value.version}"}
        assert "value" not in secret["env"]["content"][0]
    assert "MAILPIPE_SMTP_PASSWORD" not in module.locals["subscriber_env"]
    # No variable can carry the password itself, and the accessor role is on that one secret.
    assert not [v for v in module.variables if "password" in v and "secret" not in v]
    accessor = module.resource(
        "google_secret_manager_secret_iam_member", "subscriber_reads_smtp_password"
    )
    assert accessor["role"] == "roles/secretmanager.secretAccessor"
    assert accessor["member"] == "${google_service_account.subscriber.member}"
    assert "data.google_secret_manager_secret.smtp_password" in accessor["secret_id"]
    assert not [r for r in module.resources if r[0] == "google_secret_manager_secret_version"]


def test_project_level_roles_are_the_unavoidable_ones(module: Module) -> None:
    allowed = {"roles/datastore.user", "roles/cloudtrace.agent", "roles/monitoring.metricWriter"}
    for name, body in module.of_type("google_project_iam_member").items():
        assert body["role"] in allowed, f"google_project_iam_member.{name}: {body['role']}"
        if body["role"] == "roles/datastore.user":
            expression = body["condition"][0]["expression"]
            assert "resource.name" in expression and "local.firestore_database_name" in expression
    for text in _strings(module.resources):
        assert text not in ("roles/owner", "roles/editor", "roles/pubsub.admin", "roles/run.admin")


def test_firestore_record_has_a_ttl_policy(module: Module) -> None:
    database = module.resource("google_firestore_database", "record")
    assert database["type"] == "FIRESTORE_NATIVE"
    assert database["name"] == "${var.firestore_database}"
    ttl = module.resource("google_firestore_field", "record_ttl")
    assert ttl["for_each"] == {
        "${(local.record_collection)}": "${local.record_ttl_field}",
        "${(local.record_idempotency_collection)}": "${local.record_ttl_field}",
        "${(local.suppressions_collection)}": "${local.suppressions_ttl_field}",
    }
    assert ttl["collection"] == "${each.key}"
    assert ttl["field"] == "${each.value}"
    assert "ttl_config" in ttl
    # The names the Firestore record writes (its constructor's defaults).
    defaults = inspect.signature(FirestoreRecord.__init__).parameters
    assert module.locals["record_collection"] == defaults["collection"].default
    assert module.locals["record_idempotency_collection"] == (
        defaults["idempotency_collection"].default
    )
    assert module.locals["record_ttl_field"] == "expire_at"
    assert '"expire_at"' in inspect.getsource(firestore_record_module)


def test_all_apis_are_enabled(module: Module) -> None:
    services = module.locals["services"]
    for api in (
        "pubsub",
        "run",
        "cloudtrace",
        "monitoring",
        "logging",
        "secretmanager",
        "artifactregistry",
        "firestore",
        "iam",
    ):
        assert f'"{api}.googleapis.com"' in services, f"{api} API not enabled"


def test_alert_policies_watch_lag_dead_letters_and_error_ratio(module: Module) -> None:
    lag = module.resource("google_monitoring_alert_policy", "delivery_lag")
    threshold = lag["conditions"][0]["condition_threshold"][0]
    assert "subscription/oldest_unacked_message_age" in threshold["filter"]
    assert "local.delivery_subscription_filter" in threshold["filter"]
    assert threshold["threshold_value"] == "${var.oldest_unacked_age_threshold_seconds}"
    assert module.variables["oldest_unacked_age_threshold_seconds"]["default"] == 600

    # One policy per subscription where dead letters wait: the mails', and the webhooks' events'.
    dead = module.resource("google_monitoring_alert_policy", "dead_letters")
    assert dead["for_each"] == "${local.dead_letter_alerts}"
    threshold = dead["conditions"][0]["condition_threshold"][0]
    assert "subscription/num_undelivered_messages" in threshold["filter"]
    assert (
        'resource.labels.subscription_id = \\"${each.value.subscription}\\"'
        in (threshold["filter"])
    )
    assert (threshold["comparison"], threshold["threshold_value"]) == ("COMPARISON_GT", 0)
    watched = module.locals["dead_letter_alerts"]
    assert "mails = {subscription = local.dead_letter_subscription_name" in watched
    assert (
        "local.event_webhooks_enabled ? {event_webhooks = {subscription = "
        "google_pubsub_subscription.event_webhook_dead_letter[0].name"
    ) in watched

    ratio = module.resource("google_monitoring_alert_policy", "delivery_error_ratio")
    promql = ratio["conditions"][0]["condition_prometheus_query_language"][0]
    assert promql["disable_metric_validation"] is True
    template = module.locals["outcome_rate"]
    # Cloud Monitoring's PromQL mapping: first "/" -> ":", every other "." or "/" -> "_".
    for outcome in ("delivered", "deferred", "bounced"):
        metric_type = f"workload.googleapis.com/mailpipe.mails.{outcome}"
        domain, path = metric_type.split("/", 1)
        promql_name = re.sub(r"[./]", "_", domain) + ":" + re.sub(r"[./]", "_", path)
        assert promql_name == f"workload_googleapis_com:mailpipe_mails_{outcome}"
        assert "workload_googleapis_com:mailpipe_mails_${outcome}" in template
        assert f"local.outcome_rate.{outcome}" in promql["query"]

    for policy in module.of_type("google_monitoring_alert_policy").values():
        assert policy["notification_channels"] == "${var.notification_channels}"


CANARY_TFVARS: dict[str, Any] = {
    "canary": {
        "imap_host": "imap.example.com",
        "imap_user": "canary@example.com",
        "imap_password_secret_id": "mailpipe-canary-imap-password",
    },
    "canary_image": "europe-west1-docker.pkg.dev/mailpipe-prod-123/mailpipe/canary:v1",
}


def test_every_alert_policy_has_a_severity_and_closes_by_itself(module: Module) -> None:
    policies = module.of_type("google_monitoring_alert_policy")
    assert set(policies) == {"delivery_lag", "dead_letters", "delivery_error_ratio", "canary"}
    for name, policy in policies.items():
        assert policy.get("severity") in ("CRITICAL", "ERROR", "WARNING"), name
        assert policy["alert_strategy"] == [{"auto_close": "${local.alert_auto_close}"}], name
    assert module.locals["alert_auto_close"] == "${var.alert_auto_close_seconds}s"
    condition = module.variables["alert_auto_close_seconds"]["validation"][0]["condition"]
    assert ">= 1800" in condition and "<= 604800" in condition


def _promql_queries(module: Module) -> dict[str, str]:
    """``{policy/condition: query expression}`` of every PromQL condition."""
    queries = {}
    for name, policy in module.of_type("google_monitoring_alert_policy").items():
        for condition in policy["conditions"]:
            for promql in condition.get("condition_prometheus_query_language", []):
                query = promql["query"]
                expression = query[2:-1] if _is_expression(query) else json.dumps(query)
                queries[f"{name}/{condition['display_name']}"] = expression
    return queries


METRIC_SELECTOR = re.compile(r"(workload_googleapis_com:[a-z0-9_]+)(\{[^}]*\})?")


def test_every_promql_query_names_the_monitored_resource(module: Module, tmp_path: Path) -> None:
    """mailpipe's metrics reach Cloud Monitoring under generic_task (a Cloud Run service whose
    instance was detected) or generic_node (the exporter's fallback); a PromQL query over a metric
    written under more than one resource type must name it. Every metric in every query is read
    under each type, by name."""
    types = module.locals["metric_resource_types"]
    assert types == ["generic_task", "generic_node"]
    queries = _promql_queries(module)
    assert len(queries) == 4
    ok, evaluated = _evaluate(module, tmp_path, queries, CANARY_TFVARS)
    assert ok, evaluated
    for name, query in evaluated.items():
        selectors = METRIC_SELECTOR.findall(query)
        assert selectors, f"{name}: no workload.googleapis.com metric in {query}"
        for metric, labels in selectors:
            assert re.search(r'monitored_resource="[a-z_]+"', labels), f"{name}: {metric} {labels}"
        for metric in {m for m, _ in selectors}:
            named = {
                t for m, labels in selectors if m == metric for t in types if f'"{t}"' in labels
            }
            assert named == set(types), f"{name}: {metric} is read under {named} only"
        assert query.count("(") == query.count(")"), f"{name}: unbalanced {query}"
    # The no-run condition fires only when the runs metric is absent under every type.
    [no_run] = [q for name, q in evaluated.items() if "no canary run" in name]
    assert no_run.count("absent_over_time(") == len(types) and " and on() " in no_run


def test_canary_job_runs_the_canary_image(module: Module) -> None:
    job = module.resource("google_cloud_run_v2_job", "canary")
    [container] = job["template"][0]["template"][0]["containers"]
    # canary/Dockerfile: the core and the canary only; its CMD is the job's command.
    assert container["image"] == "${var.canary_image}"
    assert container_command(job) == ["python", "-m", "canary"]
    dockerfile = (REPO / "canary" / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile.rstrip().endswith('CMD ["python", "-m", "canary"]')
    assert "${var.canary_image != null}" in _conditions(job), "a canary without its image"
    variable = module.variables["canary_image"]
    assert variable.get("default") is None and variable["type"] == "string"
    assert "image" not in module.variables["canary"]["type"], "one place to name the image"


def test_canary_reaches_an_internal_publisher_through_direct_vpc_egress(module: Module) -> None:
    job = module.resource("google_cloud_run_v2_job", "canary")
    template = job["template"][0]["template"][0]
    vpc = _dynamic(template, "vpc_access")
    assert vpc["for_each"] == "${local.canary_vpc ? [var.canary_vpc_egress] : []}"
    [content] = vpc["content"]
    # All traffic: the publisher's run.app address is public, so private ranges only would let
    # the request leave outside the VPC, where internal ingress refuses it.
    assert content["egress"] == "ALL_TRAFFIC"
    assert content["network_interfaces"] == [
        {
            "network": "${vpc_access.value.network}",
            "subnetwork": "${vpc_access.value.subnetwork}",
            "tags": "${vpc_access.value.network_tags}",
        }
    ]
    assert module.locals["canary_vpc"] == "${local.canary_enabled && var.canary_vpc_egress != null}"
    conditions = _conditions(job)
    assert '${var.publisher_ingress == "INGRESS_TRAFFIC_ALL" || local.canary_vpc}' in conditions, (
        "an internal publisher without VPC egress for the canary must fail at plan"
    )
    assert any("private_ip_google_access" in c for c in conditions)
    assert "${local.canary_subnetwork_region == var.region}" in conditions
    subnetwork = module.data[("google_compute_subnetwork", "canary")]
    assert subnetwork["count"] == "${local.canary_vpc ? 1 : 0}"
    variable = module.variables["canary_vpc_egress"]
    assert variable.get("default") is None
    assert "subnetwork" in variable["type"] and "network" in variable["type"]


CANARY_VPC_CASES = [
    ("public publisher, no VPC", {}, True, None),
    ("no canary image", {"canary_image": None}, False, None),
    (
        "internal publisher, no VPC",
        {"publisher_ingress": "INGRESS_TRAFFIC_INTERNAL_ONLY"},
        False,
        None,
    ),
    (
        "internal publisher, a subnetwork of the project",
        {
            "publisher_ingress": "INGRESS_TRAFFIC_INTERNAL_ONLY",
            "canary_vpc_egress": {"subnetwork": "run-egress"},
        },
        True,
        ["mailpipe-prod-123", "europe-west1", "run-egress"],
    ),
    (
        "internal publisher, a Shared VPC subnetwork",
        {
            "publisher_ingress": "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER",
            "canary_vpc_egress": {
                "subnetwork": "projects/host-1/regions/europe-west1/subnetworks/s"
            },
        },
        True,
        ["host-1", "europe-west1", "s"],
    ),
    (
        "a subnetwork of another region",
        {"canary_vpc_egress": {"subnetwork": "projects/host-1/regions/us-central1/subnetworks/s"}},
        False,
        ["host-1", "us-central1", "s"],
    ),
]


@pytest.mark.parametrize(
    ("case", "tfvars", "holds", "subnetwork"),
    CANARY_VPC_CASES,
    ids=[c[0] for c in CANARY_VPC_CASES],
)
def test_canary_vpc_egress_evaluated(
    module: Module,
    tmp_path: Path,
    case: str,
    tfvars: dict[str, Any],
    holds: bool,
    subnetwork: list[str] | None,
) -> None:
    conditions = [
        c[2:-1]
        for c in _conditions(module.resource("google_cloud_run_v2_job", "canary"))
        if "data." not in c  # Private Google Access is read from the subnetwork at plan time
    ]
    ok, result = _evaluate(
        module,
        tmp_path,
        {
            "holds": " && ".join(f"({c})" for c in conditions),
            "vpc": "local.canary_vpc",
            "subnetwork": (
                "[local.canary_subnetwork_project, local.canary_subnetwork_region,"
                " local.canary_subnetwork[2]]"
            ),
        },
        {**CANARY_TFVARS, **tfvars},
    )
    assert ok, result
    assert result["holds"] is holds, f"{case}: {result}"
    assert result["vpc"] is (subnetwork is not None)
    if subnetwork:
        assert result["subnetwork"] == subnetwork


# ------------------------------------------------------------------------------------------------
# Pull mode
# ------------------------------------------------------------------------------------------------


def test_pull_mode_runs_a_worker_pool_with_cpu_always_and_at_least_one_instance(
    module: Module,
) -> None:
    mode = module.variables["subscriber_mode"]
    assert mode["default"] == "push"
    assert (
        mode["validation"][0]["condition"] == '${contains(["push", "pull"], var.subscriber_mode)}'
    )
    assert module.locals["push_mode"] == '${var.subscriber_mode == "push"}'
    assert module.locals["pull_mode"] == '${var.subscriber_mode == "pull"}'

    pool = module.resource("google_cloud_run_v2_worker_pool", "subscriber")
    assert pool["count"] == "${local.pull_mode ? 1 : 0}"
    assert container_command(pool) == ["python", "-m", "subscriber", "pull"]
    # A worker pool's instances keep their CPU (instance-based billing, no request to throttle
    # around) and do not scale by themselves: the count is the instances always running.
    assert pool["scaling"] == [{"manual_instance_count": "${var.subscriber_pull_instances}"}]
    instances = module.variables["subscriber_pull_instances"]
    assert instances["default"] >= 1
    assert "var.subscriber_pull_instances >= 1" in instances["validation"][0]["condition"]
    template = pool["template"][0]
    assert template["service_account"] == "${google_service_account.subscriber.email}"
    assert template["containers"][0]["image"] == "${var.subscriber_image}"
    assert "ports" not in template["containers"][0], "the pull worker serves no HTTP"
    assert pool["deletion_protection"] == "${var.deletion_protection}"


def test_pull_mode_grants_subscriber_on_the_pulled_subscriptions_only(
    module: Module, topology: Topology
) -> None:
    grant = module.resource("google_pubsub_subscription_iam_member", "subscriber_pulls")
    assert grant["for_each"] == "${local.pull_mode ? local.subscriber_subscriptions : {}}"
    assert grant["role"] == "roles/pubsub.subscriber"
    assert grant["member"] == "${google_service_account.subscriber.member}"
    assert grant["subscription"] == "${google_pubsub_subscription.subscription[each.key].name}"
    assert module.locals["subscriber_subscriptions"] == "${local.push_subscriptions}"
    # Those are exactly the subscriptions `python -m subscriber pull` reads (subscriber/main.py:
    # the delivery subscription and the dead-letter record subscription)...
    pulled = {s.key for s in topology.subscriptions.values() if s.delivery == "push"}
    assert pulled == {"delivery", "dead_letter_record"}
    source = (REPO / "subscriber" / "main.py").read_text(encoding="utf-8")
    run_pull = source[source.index("def run_pull") : source.index("def main")]
    assert "config.pubsub.subscription_path" in run_pull
    assert "config.pubsub.dead_letter_record_subscription_path" in run_pull
    # ...and the grant's comment says why, like every role's.
    text = TERRAFORM / module.file_of("google_pubsub_subscription_iam_member", "subscriber_pulls")
    block = text.read_text(encoding="utf-8").split('"subscriber_pulls"')[0].rsplit("\n\n", 1)[-1]
    assert block.lstrip().startswith("#") and "dead-letter record" in block
    # No other Pub/Sub role for the subscriber, anywhere.
    for (rtype, name), body in module.resources.items():
        if "_iam_" in rtype and "google_service_account.subscriber." in str(body.get("member")):
            assert not body["role"].startswith("roles/pubsub.") or name == "subscriber_pulls"


def test_pull_mode_evaluated(module: Module, tmp_path: Path, topology: Topology) -> None:
    ok, result = _evaluate(
        module,
        tmp_path,
        {"pulled": "keys(local.subscriber_subscriptions)", "pull": "local.pull_mode"},
        {"subscriber_mode": "pull"},
    )
    assert ok, result
    assert result["pull"] is True
    assert sorted(result["pulled"]) == ["dead_letter_record", "delivery"]
    names = {topology.subscriptions[key].name for key in result["pulled"]}
    assert names == {
        topology.delivery_subscription.name,
        topology.dead_letter_record_subscription.name,
    }
    for bad in ("both", "PULL", ""):
        refused, message = _evaluate(
            module, tmp_path, {"m": "var.subscriber_mode"}, {"subscriber_mode": bad}
        )
        assert not refused and "subscriber_mode" in message, bad
    refused, message = _evaluate(
        module, tmp_path, {"n": "var.subscriber_pull_instances"}, {"subscriber_pull_instances": 0}
    )
    assert not refused and "subscriber_pull_instances" in message


# ------------------------------------------------------------------------------------------------
# The reconcile job
# ------------------------------------------------------------------------------------------------


def _grants_to(module: Module, member: str) -> dict[str, dict[str, Any]]:
    """Every IAM grant whose member expression names ``member``, by resource address."""
    return {
        f"{rtype}.{name}": body
        for (rtype, name), body in module.resources.items()
        if "_iam_" in rtype and member in str(body.get("member"))
    }


def _check_schedules(module: Module) -> None:
    """Each scheduled job (local.scheduled_jobs, while enabled) is started by a scheduler job
    whose own identity holds one grant: run.invoker on that job."""
    assert module.locals["schedules"] == (
        "${{for name, job in local.scheduled_jobs : name => job if job.enabled}}"
    )
    identity = module.resource("google_service_account", "scheduler")
    assert identity["for_each"] == "${local.schedules}"
    scheduler = module.resource("google_cloud_scheduler_job", "schedule")
    assert scheduler["for_each"] == "${local.schedules}"
    assert scheduler["schedule"] == "${each.value.schedule}"
    target = scheduler["http_target"][0]
    assert target["uri"].endswith("/jobs/${each.value.job}:run")
    assert target["oauth_token"][0]["service_account_email"] == (
        "${google_service_account.scheduler[each.key].email}"
    )
    grants = _grants_to(module, "google_service_account.scheduler")
    assert set(grants) == {"google_cloud_run_v2_job_iam_member.scheduler_runs_job"}
    runner = grants["google_cloud_run_v2_job_iam_member.scheduler_runs_job"]
    assert runner["for_each"] == "${local.schedules}"
    assert runner["role"] == "roles/run.invoker"
    assert runner["member"] == "${google_service_account.scheduler[each.key].member}"
    assert runner["name"] == "${each.value.job}"


def test_the_canary_and_reconcile_schedules_keep_their_state(module: Module) -> None:
    """schedules.tf replaced per-job resources: `moved` blocks carry the state of a deployment
    made before, so the scheduler accounts and jobs are not destroyed and created again."""
    moved = {(m["from"], m["to"]) for m in module.by_file["schedules.tf"]["moved"]}
    for job in ("canary", "reconcile"):
        assert (
            f"${{google_service_account.{job}_scheduler[0]}}",
            f'${{google_service_account.scheduler["{job}"]}}',
        ) in moved
        assert (
            f"${{google_cloud_run_v2_job_iam_member.scheduler_runs_{job}[0]}}",
            f'${{google_cloud_run_v2_job_iam_member.scheduler_runs_job["{job}"]}}',
        ) in moved
        assert (
            f"${{google_cloud_scheduler_job.{job}[0]}}",
            f'${{google_cloud_scheduler_job.schedule["{job}"]}}',
        ) in moved
    scheduled = module.locals["scheduled_jobs"]
    assert "schedule = try(local.canary.schedule, null)" in scheduled
    # The CLI jobs are scheduled under their own names (reconcile, dlq-replay: the keys above).
    assert "for name, job in local.cli_jobs : name => " in scheduled
    assert "job = google_cloud_run_v2_job.cli_job[name].name" in scheduled
    assert "schedule = job.schedule" in scheduled


# Stand-ins for the locals that read service accounts' members (resources need the providers).
MEMBER_STUBS = {
    "services_members": '{publisher = "serviceAccount:pub", subscriber = "serviceAccount:sub"}',
    "cli_job_members": '{for name, job in local.cli_jobs : name => "serviceAccount:${name}"}',
}


def test_the_cli_jobs_are_one_for_each_keyed_by_job_name(module: Module) -> None:
    """reconcile and dlq-replay (cli_jobs.tf): one job resource and one service account resource,
    for_each over the enabled entries of local.cli_job_declarations; what differs is data."""
    assert not [key for key in module.resources if key[1] in ("reconcile", "dlq_replay")], (
        "a CLI job declared on its own again"
    )
    declarations = module.locals["cli_job_declarations"]
    assert set(declarations) == {"reconcile", "dlq-replay"}
    assert module.locals["cli_jobs"] == (
        "${{for name, job in local.cli_job_declarations : name => job if job.enabled}}"
    )
    account = module.resource("google_service_account", "cli_job")
    assert account["for_each"] == "${local.cli_jobs}"
    assert account["account_id"] == "mailpipe-${each.key}"
    job = module.resource("google_cloud_run_v2_job", "cli_job")
    assert job["for_each"] == "${local.cli_jobs}"
    assert job["name"] == "mailpipe-${each.key}"
    template = job["template"][0]["template"][0]
    assert template["service_account"] == "${google_service_account.cli_job[each.key].email}"
    assert template["timeout"] == "${each.value.timeout_seconds}s"
    [container] = template["containers"]
    # The publisher image carries the mailpipe CLI.
    assert container["image"] == "${coalesce(each.value.image, var.publisher_image)}"
    assert cli_job_command(module, "reconcile") == ["mailpipe", "reconcile", "--fix"]
    assert cli_job_command(module, "dlq-replay") == ["mailpipe", "dlq", "replay", "--due", "--json"]
    for name, variable in (("reconcile", "reconcile"), ("dlq-replay", "dlq_replay")):
        entry = declarations[name]
        assert entry["enabled"] == f"${{var.{variable}.enabled}}"
        assert entry["image"] == f"${{var.{variable}.image}}"
        assert entry["timeout_seconds"] == f"${{var.{variable}.timeout_seconds}}"
    assert declarations["reconcile"]["schedule"] == "${var.reconcile.schedule}"
    assert declarations["dlq-replay"]["schedule"] == "*/${var.dlq_replay.every_minutes} * * * *"
    # reconcile exports nothing (so holds no Trace or Monitoring role); dlq-replay exports spans.
    assert declarations["reconcile"]["exports_telemetry"] is False
    assert declarations["dlq-replay"]["exports_telemetry"] is True
    # Cloud Run's timeout is per attempt: a retried replay pass could run into the next one.
    assert template["max_retries"] == "${each.value.max_retries}"
    retries = {name: entry["max_retries"] for name, entry in declarations.items()}
    assert retries == {"reconcile": 1, "dlq-replay": 0}
    variable = module.variables["reconcile"]
    assert 'schedule = optional(string, "*/10 * * * *")' in variable["type"].replace("\n", " ")
    assert "every_minutes = optional(number, 5)" in module.variables["dlq_replay"]["type"]
    assert '"cloudscheduler.googleapis.com"' in module.locals["services"]
    assert "length(local.cli_jobs) > 0" in module.locals["services"]
    _check_schedules(module)


def _cli_job_expression(module: Module, text: str) -> str:
    """A per-instance expression of the cli_job resource, as a map over local.cli_jobs."""
    body = text[2:-1].replace("each.value", "job").replace("each.key", "name")
    return f"{{for name, job in local.cli_jobs : name => ({body})}}"


CLI_JOB_CASES = [
    ("defaults", {}, {"reconcile", "dlq-replay"}, True),
    ("reconcile off", {"reconcile": {"enabled": False}}, {"dlq-replay"}, True),
    ("dlq-replay off", {"dlq_replay": {"enabled": False}}, {"reconcile"}, True),
    ("grace within the retry backoff", {"reconcile_grace_seconds": 600}, None, False),
    ("grace past the retry backoff", {"reconcile_grace_seconds": 601}, None, True),
]


@pytest.mark.parametrize(
    ("case", "tfvars", "jobs", "holds"), CLI_JOB_CASES, ids=[c[0] for c in CLI_JOB_CASES]
)
def test_cli_jobs_evaluated(
    module: Module,
    tmp_path: Path,
    case: str,
    tfvars: dict[str, Any],
    jobs: set[str] | None,
    holds: bool,
) -> None:
    """The job resource's own expressions, evaluated per job by a real `terraform console`:
    which jobs exist, their environment and precondition, and who holds which grant."""
    job = module.resource("google_cloud_run_v2_job", "cli_job")
    [condition] = _conditions(job)
    env = _dynamic(job["template"][0]["template"][0]["containers"][0], "env")["for_each"]
    ok, result = _evaluate(
        module,
        tmp_path,
        {
            "jobs": "local.cli_jobs",
            "holds": _cli_job_expression(module, condition),
            "env": _cli_job_expression(module, env),
            "publisher": "local.publisher_env",
            "telemetry": "local.runtime_members",
            "record": "local.record_users",
            "dlq_replay": "local.dlq_replay_member",
        },
        {"operators": ["group:ops@example.com"], **tfvars},
        MEMBER_STUBS,
    )
    assert ok, result
    if jobs is not None:
        assert set(result["jobs"]) == jobs, case
    # The grace is checked where reconcile runs, and nowhere else.
    assert result["holds"].get("reconcile", True) is holds, case
    assert result["holds"].get("dlq-replay", True) is True
    publisher = result["publisher"]
    assert result["env"].get("reconcile", {**publisher, "MAILPIPE_TRACES": "none"}) == {
        **publisher,
        "MAILPIPE_TRACES": "none",
    }
    assert result["env"].get("dlq-replay", publisher) == publisher
    assert publisher["MAILPIPE_RECORD"] == "firestore://mailpipe"
    assert publisher["MAILPIPE_RECONCILE_GRACE_SECONDS"] == str(
        tfvars.get("reconcile_grace_seconds", 900)
    )
    # Least privilege, one account per job: each job reads and writes the record; only the one
    # that exports telemetry may write spans and metrics; only dlq-replay gets its Pub/Sub grants.
    enabled = set(result["jobs"])
    assert set(result["record"]) == {"publisher", "subscriber", "group:ops@example.com"} | enabled
    assert set(result["telemetry"]) == {"publisher", "subscriber"} | (enabled & {"dlq-replay"})
    assert set(result["dlq_replay"]) == enabled & {"dlq-replay"}
    assert result["record"]["group:ops@example.com"] == "group:ops@example.com"


def test_the_cli_jobs_accounts_hold_only_what_they_need(module: Module) -> None:
    """No grant names a job's account directly: they reach it through the four maps
    test_cli_jobs_evaluated evaluates, and these are every grant over those maps."""
    assert _grants_to(module, "google_service_account.cli_job") == {}
    by_map = {
        f"{rtype}.{name}": body["for_each"]
        for (rtype, name), body in module.resources.items()
        if "_iam_" in rtype
        and any(
            f"local.{m}" in str(body.get("for_each"))
            for m in ("record_users", "runtime_members", "dlq_replay_member", "event_publishers")
        )
    }
    assert by_map == {
        "google_project_iam_member.record_access": "${local.record_users}",
        "google_project_iam_member.runtime_trace_writer": "${local.runtime_members}",
        "google_project_iam_member.runtime_metric_writer": "${local.runtime_members}",
        "google_pubsub_subscription_iam_member.dlq_replay_pulls_dead_letters": (
            "${local.dlq_replay_member}"
        ),
        "google_pubsub_topic_iam_member.dlq_replay_publishes_mail": "${local.dlq_replay_member}",
        "google_pubsub_topic_iam_member.emitters_publish_events": "${local.event_publishers}",
    }
    pulls = module.resource(
        "google_pubsub_subscription_iam_member", "dlq_replay_pulls_dead_letters"
    )
    assert (pulls["role"], pulls["subscription"]) == (
        "roles/pubsub.subscriber",
        '${google_pubsub_subscription.subscription["dead_letter"].name}',
    )
    publishes = module.resource("google_pubsub_topic_iam_member", "dlq_replay_publishes_mail")
    assert (publishes["role"], publishes["topic"]) == (
        "roles/pubsub.publisher",
        '${google_pubsub_topic.topic["mail"].name}',
    )
    # Its replayed and expired events.
    assert "local.dlq_replay_member" in module.locals["event_publishers"]
    # The record grant: one resource, on the mailpipe database only.
    [record] = [
        body
        for body in module.of_type("google_project_iam_member").values()
        if body["role"] == "roles/datastore.user"
    ]
    assert record["for_each"] == "${local.record_users}"
    assert "local.firestore_database_name" in record["condition"][0]["expression"]


# Every address a deployment made before the folds has, and where its object went: the CLI jobs
# (cli_jobs.tf), the record grant (iam.tf), the dead-letter publish grant (keyed by topic now), the
# dead-letter alert (one per dead-letter subscription now).
RENAMED = {
    "google_service_account.reconcile[0]": 'google_service_account.cli_job["reconcile"]',
    "google_service_account.dlq_replay[0]": 'google_service_account.cli_job["dlq-replay"]',
    "google_cloud_run_v2_job.reconcile[0]": 'google_cloud_run_v2_job.cli_job["reconcile"]',
    "google_cloud_run_v2_job.dlq_replay[0]": 'google_cloud_run_v2_job.cli_job["dlq-replay"]',
    **{
        f'google_project_iam_member.runtime_record_access["{key}"]': (
            f'google_project_iam_member.record_access["{key}"]'
        )
        for key in ("publisher", "subscriber", "dlq-replay")
    },
    "google_project_iam_member.reconcile_record_access[0]": (
        'google_project_iam_member.record_access["reconcile"]'
    ),
    # Keyed by the member before and after: the whole resource moves.
    "google_project_iam_member.operators_record_access": "google_project_iam_member.record_access",
    'google_pubsub_topic_iam_member.pubsub_agent_publishes_dead_letters["delivery"]': (
        'google_pubsub_topic_iam_member.pubsub_agent_publishes_dead_letters["dead_letter"]'
    ),
    # One alert per dead-letter subscription now.
    "google_monitoring_alert_policy.dead_letters": (
        'google_monitoring_alert_policy.dead_letters["mails"]'
    ),
}

ADDRESS = re.compile(r"^([a-z0-9_]+)\.([a-z0-9_]+)(?:\[(.+)\])?$")


def _moved(module: Module) -> dict[str, str]:
    """Every `moved` block of the module: from => to, as addresses."""
    return {
        block["from"][2:-1]: block["to"][2:-1]
        for doc in module.by_file.values()
        for block in doc.get("moved", [])
    }


def test_every_renamed_address_has_a_moved_block(module: Module, topology: Topology) -> None:
    """A deployment made before the folds keeps its objects: each old address moves to the one
    that now holds it, whose resource exists (for_each) while the old resource does not."""
    moved = _moved(module)
    for old, new in RENAMED.items():
        assert moved.get(old) == new, f"no moved block from {old} to {new}"
    for old, new in moved.items():
        old_match, new_match = ADDRESS.match(old), ADDRESS.match(new)
        assert old_match and new_match, (old, new)
        if old_match.group(1, 2) != new_match.group(1, 2):  # renamed, not only re-keyed
            assert old_match.group(1, 2) not in module.resources, (
                f"{old}'s resource is still declared"
            )
        target = module.resource(new_match[1], new_match[2])
        assert "for_each" in target, f"{new}: moved into a resource without for_each"
    # The keys moved into are keys the new resources have.
    for name in ("reconcile", "dlq-replay"):
        assert name in module.locals["cli_job_declarations"]
    assert topology.subscriptions["delivery"].dead_letter is not None
    assert topology.subscriptions["delivery"].dead_letter.topic == "dead_letter"
    # (record_access's keys: test_cli_jobs_evaluated evaluates local.record_users.)


def _stand_in(address: str) -> tuple[str, str | None]:
    """A module address as a terraform_data address: (resource, instance key or None)."""
    match = ADDRESS.match(address)
    assert match, address
    return f"terraform_data.{match[1]}__{match[2]}", match[3]


def _stand_in_config(instances: dict[str, set[str]], moved: Mapping[str, str] | None = None) -> str:
    """terraform_data resources with those instance keys ("0": count = 1; "": neither count nor
    for_each), and moved blocks."""
    lines = []
    for resource, keys in sorted(instances.items()):
        name = resource.split(".", 1)[1]
        each = {
            frozenset({"0"}): "count = 1",
            frozenset({""}): "",
        }.get(frozenset(keys), f"for_each = toset({json.dumps(sorted(keys))})")
        lines.append(f'resource "terraform_data" "{name}" {{\n  {each}\n}}')
    for old, new in (moved or {}).items():
        lines.append(f"moved {{\n  from = {old}\n  to   = {new}\n}}")
    return "\n".join(lines) + "\n"


def test_the_moved_blocks_keep_every_object_in_a_real_plan(module: Module, tmp_path: Path) -> None:
    """Terraform itself applies the module's moved blocks to a state that has every old address
    (terraform_data stand-ins, no provider needed): the plan only moves, never creates or
    destroys. A whole-resource move and instance moves into one resource (record_access) must be
    ordered right, which only Terraform can say."""
    if _terraform() is None:
        pytest.skip("terraform binary not found: moved blocks not planned (HCL checks still ran)")
    operators = {'"user:ops@example.com"', '"group:sre@example.com"'}
    old: dict[str, set[str]] = {}
    new: dict[str, set[str]] = {}
    moves: dict[str, str] = {}
    for source, target in _moved(module).items():
        (old_resource, old_key), (new_resource, new_key) = _stand_in(source), _stand_in(target)
        # No key on either side: the whole resource moves (the operators' grants, keyed by
        # member); on the old side only: a single object without count or for_each.
        old_keys = {old_key} if old_key else ({'""'} if new_key else operators)
        new_keys = {new_key} if new_key else operators
        old.setdefault(old_resource, set()).update(old_keys)
        new.setdefault(new_resource, set()).update(new_keys)
        moves[old_resource + (f"[{old_key}]" if old_key else "")] = new_resource + (
            f"[{new_key}]" if new_key else ""
        )

    def unquoted(keys: dict[str, set[str]]) -> dict[str, set[str]]:
        return {r: {k if k == "0" else json.loads(k) for k in ks} for r, ks in keys.items()}

    def run(*args: str) -> str:
        result = _run_terraform(*args, "-no-color", cwd=tmp_path)
        assert result.returncode == 0, f"terraform {args[0]}:\n{result.stdout}{result.stderr}"
        return result.stdout

    config = tmp_path / "main.tf"
    config.write_text(_stand_in_config(unquoted(old)))
    run("init", "-input=false")
    run("apply", "-auto-approve", "-input=false")
    config.write_text(_stand_in_config(unquoted(new), moves))
    run("plan", "-input=false", "-out=plan")
    plan = json.loads(run("show", "-json", "plan"))
    changes = plan["resource_changes"]
    assert {tuple(c["change"]["actions"]) for c in changes} == {("no-op",)}, changes
    moved_from = {c.get("previous_address") for c in changes}
    expected = sum(len(keys) for keys in old.values())
    assert len(changes) == expected and None not in moved_from, changes


def test_every_role_grant_says_why(module: Module) -> None:
    """Each IAM resource has its own comment between it and the block before it."""
    missing = []
    for (rtype, name), _body in module.resources.items():
        if "_iam_" not in rtype:
            continue
        text = (TERRAFORM / module.file_of(rtype, name)).read_text(encoding="utf-8")
        before = text[: text.index(f'resource "{rtype}" "{name}"')]
        since_last_block = re.split(r"\n(?:resource|data) \"", before)[-1].split("\n}\n", 1)[-1]
        if not any(line.lstrip().startswith("#") for line in since_last_block.splitlines()):
            missing.append(f"{rtype}.{name}")
    assert missing == [], f"IAM grants without a comment saying why: {missing}"


# ------------------------------------------------------------------------------------------------
# Variables, evaluated
# ------------------------------------------------------------------------------------------------

VARIABLE_CASES = [
    ("allowed_sender_domains", ["mail.example.com", "example.org"], True),
    ("allowed_sender_domains", [], False),
    ("allowed_sender_domains", ["*.example.com"], False),
    ("allowed_sender_domains", ["noreply@example.com"], False),
    ("allowed_sender_domains", ["a.example.com,b.example.com"], False),
    ("sandbox_callers", ["ci@p.iam.gserviceaccount.com", "sub:1234", "*"], True),
    ("sandbox_callers", ["serviceAccount:ci@p.iam.gserviceaccount.com"], False),
    ("sandbox_callers", ["a@example.com,b@example.com"], False),
    ("alert_auto_close_seconds", 1800, True),
    ("alert_auto_close_seconds", 600, False),
    ("canary_vpc_egress", {"subnetwork": "projects/h/regions/europe-west1/subnetworks/s"}, True),
    ("canary_vpc_egress", {"subnetwork": "https://www.googleapis.com/x"}, False),
    ("reconcile", {"schedule": "*/5 * * * *"}, True),
    ("reconcile", {"schedule": "every 5 minutes"}, False),
    ("dlq_replay", {"every_minutes": 10}, True),
    ("dlq_replay", {"every_minutes": 0}, False),
    ("dlq_replay", {"every_minutes": 2.5}, False),
    ("dlq_replay", {"every_minutes": 31}, False),
    ("dlq_replay", {"every_minutes": 2, "timeout_seconds": 600}, False),  # passes would overlap
    ("dlq_replay", {"every_minutes": 10, "timeout_seconds": 600}, True),
    ("delivery_timeout_seconds", 0, False),
    ("smtp_pool_wait_seconds", 0, False),
]


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    VARIABLE_CASES,
    ids=[f"{n}={json.dumps(v)}" for n, v, _ in VARIABLE_CASES],
)
def test_variable_validation(
    module: Module, tmp_path: Path, name: str, value: Any, accepted: bool
) -> None:
    ok, result = _evaluate(module, tmp_path, {"value": f"var.{name}"}, {name: value})
    assert ok is accepted, result
    if not ok:
        assert "Invalid value for variable" in result and name in result


def test_the_publisher_gets_the_allowed_sender_domains(module: Module, tmp_path: Path) -> None:
    variable = module.variables["allowed_sender_domains"]
    assert variable["type"] == "${list(string)}"
    assert "default" not in variable, "a deployment must name its sender domains"
    ok, result = _evaluate(
        module,
        tmp_path,
        {"env": "local.publisher_env"},
        {"allowed_sender_domains": ["mail.example.com", "example.org"]},
    )
    assert ok, result
    assert result["env"]["MAILPIPE_ALLOWED_SENDER_DOMAINS"] == "mail.example.com,example.org"
    assert result["env"]["MAILPIPE_PUBLISH_TIMEOUT"] == "30"
    assert result["env"]["MAILPIPE_SANDBOX_CALLERS"] == ""  # default: no caller is sandboxed


# ------------------------------------------------------------------------------------------------
# The example and the deployment guide
# ------------------------------------------------------------------------------------------------


def test_the_example_passes_every_required_variable(module: Module) -> None:
    example = parse_hcl(EXAMPLE / "main.tf")
    [call] = [entry["mailpipe"] for entry in example["module"] if "mailpipe" in entry]
    required = {name for name, body in module.variables.items() if "default" not in body}
    assert required - set(call) == set(), "examples/basic does not set these"
    tfvars = (EXAMPLE / "terraform.tfvars.example").read_text(encoding="utf-8")
    example_required = {
        name
        for entry in example["variable"]
        for name, body in entry.items()
        if "default" not in body
    }
    for name in example_required:
        assert re.search(rf"^{name}\s*=", tfvars, re.MULTILINE), f"tfvars.example lacks {name}"
        assert f"`{name}`" in DEPLOY_GUIDE, f"docs/deploy.md step 3 does not mention {name}"


DEPLOY_GUIDE = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")


def test_no_documented_command_replaces_a_protected_resource(module: Module) -> None:
    """`terraform apply -replace=` destroys first; with deletion protection on (the default)
    Terraform refuses, so no instruction may rely on it for those resources."""
    protected = {
        f"{rtype}.{name}"
        for (rtype, name), body in module.resources.items()
        if "deletion_protection" in body or "delete_protection_state" in body
    }
    assert "google_cloud_run_v2_service.subscriber" in protected
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for address in re.findall(
            r"-replace=['\"]?([\w.\[\]\"-]+)", doc.read_text(encoding="utf-8")
        ):
            resource = re.sub(r"^module\.\w+\.", "", address)
            resource = re.sub(r"\[[^\]]*\]$", "", resource)
            assert resource not in protected, (
                f"{doc.name}: -replace={address} fails under protection"
            )


def test_the_secret_rotation_instruction_makes_a_new_revision_without_replacing(
    module: Module,
) -> None:
    rotation = DEPLOY_GUIDE[DEPLOY_GUIDE.index("To rotate it") :].split("\n\n")[0]
    assert "gcloud secrets versions add mailpipe-smtp-password" in rotation
    assert "smtp_password_secret_version" in rotation and "terraform apply" in rotation
    assert "-replace=module." not in rotation
    assert module.variables["smtp_password_secret_version"]["default"] == "latest"
    # The instruction is one tfvars line away: the example passes the version through.
    example = parse_hcl(EXAMPLE / "main.tf")
    [call] = [entry["mailpipe"] for entry in example["module"] if "mailpipe" in entry]
    assert call["smtp_password_secret_version"] == "${var.smtp_password_secret_version}"


def test_the_deploy_guide_covers_pull_mode_and_internal_ingress() -> None:
    assert 'subscriber_mode = "pull"' in DEPLOY_GUIDE
    assert "worker pool" in DEPLOY_GUIDE and "roles/pubsub.subscriber" in DEPLOY_GUIDE
    troubleshooting = DEPLOY_GUIDE[DEPLOY_GUIDE.index("## Troubleshooting") :]
    rows = [line for line in troubleshooting.splitlines() if line.startswith("| ")]
    assert any(
        "publish_failed" in row and "canary_vpc_egress" in row and "Private Google Access" in row
        for row in rows
    ), "a troubleshooting row for an internal publisher the canary cannot reach"
    assert "reconcile" in DEPLOY_GUIDE and "allowed_sender_domains" in DEPLOY_GUIDE


def test_variables_and_outputs_are_typed_and_described(module: Module) -> None:
    for name, body in module.variables.items():
        assert body.get("type"), f"variable {name} has no type"
        assert len(body.get("description", "")) > 10, f"variable {name} has no description"
    for name, body in module.outputs.items():
        assert len(body.get("description", "")) > 10, f"output {name} has no description"
        assert "sensitive" not in body, f"output {name}: secrets are never output"
    assert {"publisher_url", "publisher_env", "subscriber_env"} <= set(module.outputs)


def test_terraform_fmt_is_clean() -> None:
    if _terraform() is None:
        pytest.skip("terraform binary not found: `terraform fmt -check` not run")
    result = _run_terraform("fmt", "-check", "-recursive", "-diff", str(TERRAFORM), timeout=60)
    assert result.returncode == 0, f"run `terraform fmt -recursive terraform/`:\n{result.stdout}"


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("publisher", '["python", "-m", "publisher"]'),
        ("subscriber", '["python", "-m", "subscriber", "push"]'),
        ("canary", '["python", "-m", "canary"]'),
    ],
)
def test_dockerfile_is_slim_pinned_non_root_and_runs_the_service(
    service: str, command: str
) -> None:
    lines = [
        line.strip()
        for line in (REPO / service / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases and all(b.startswith("python:3.11-slim-bookworm") for b in bases), bases
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as a non-root user"
    assert lines[-1] == f"CMD {command}"
    # The services bind 127.0.0.1 unless told otherwise; Cloud Run must be able to reach them.
    # (The canary is a job: it serves nothing.)
    env = " ".join(
        line for line in lines if line.startswith(("ENV ", "MAILPIPE_", "PORT", "PYTHON"))
    )
    assert ("MAILPIPE_HTTP_HOST=0.0.0.0" in env) is (service != "canary")
    assert '"MAILPIPE_HTTP_HOST"' in _config_source()
    installs = [line for line in lines if "pip install" in line]
    assert installs == ["RUN pip install --no-cache-dir -c constraints.txt ."], (
        "install the project only, no extras, at the versions constraints.txt pins"
    )
    assert any(
        line.startswith("COPY ") and "constraints.txt" in line.split()[1:-1] for line in lines
    ), "the build needs constraints.txt in the image's build stage"
    copies = " ".join(line for line in lines if line.startswith("COPY "))
    # The publisher image also carries the operator CLI, which includes the canary's command: the
    # reconcile job runs from it (terraform/cli_jobs.tf). The CLI and the canary talk to the
    # publisher through client/; no service imports it.
    carried = {"publisher": {"canary", "client", "ops"}, "canary": {"client"}}.get(service, set())
    others = {"publisher", "subscriber", "canary", "client", "ops"} - {service} - carried
    assert f"{service}/" in copies, copies
    assert not [o for o in others if f"{o}/" in copies], "one deployable per image"


def test_dockerignore_lets_only_the_sources_in() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "mailpipe",
        "publisher",
        "subscriber",
        "canary",
        "client",
        "ops",
    }


def test_cloud_run_keeps_cpu_for_telemetry_and_declares_cloud_run_push_auth(
    module: Module,
) -> None:
    """Both services bill per instance (CPU between requests: batched span export, the 60 s metric
    export), set explicitly: with a resources block an unset cpu_idle is not request-based. The
    subscriber, behind Cloud Run IAM, checks the claims of the token Cloud Run stripped."""
    for name in ("publisher", "subscriber"):
        service = module.resource("google_cloud_run_v2_service", name)
        (container,) = service["template"][0]["containers"]
        (resources,) = container["resources"]
        assert resources["cpu_idle"] is False, f"{name}: cpu_idle = false (instance-based)"
        assert service["invoker_iam_disabled"] is False, f"{name}: Cloud Run IAM stays in front"

    (container,) = module.resource("google_cloud_run_v2_service", "subscriber")["template"][0][
        "containers"
    ]
    static_env = {entry["name"]: entry["value"] for entry in container.get("env", [])}
    declared = static_env.get("MAILPIPE_PUSH_AUTH") or (
        "cloud-run"
        if re.search(r'MAILPIPE_PUSH_AUTH\s*=\s*"cloud-run"', module.locals["subscriber_env"])
        else None
    )
    assert declared == "cloud-run"


# ------------------------------------------------------------------------------------------------
# Delivery events (docs/events.md): the topic, who may publish, integrators' webhooks
# ------------------------------------------------------------------------------------------------


def test_every_emitter_may_publish_events_and_only_there(
    module: Module, topology: Topology
) -> None:
    assert topology.events_topic.name == "mailpipe-delivery-events"
    grant = module.resource("google_pubsub_topic_iam_member", "emitters_publish_events")
    assert grant["for_each"] == "${local.event_publishers}"
    assert grant["topic"] == '${google_pubsub_topic.topic["events"].name}'
    assert grant["role"] == "roles/pubsub.publisher"
    publishers = module.locals["event_publishers"]
    for who in (
        "google_service_account.publisher.member",
        "google_service_account.subscriber.member",
        "var.operators",  # `mailpipe dlq replay` emits `replayed`
    ):
        assert who in publishers, who
    # The services get the topic from topology.json (mailpipe.events.EventsConfig): no env needed.
    assert "MAILPIPE_EVENTS_TOPIC" not in module.text


def test_event_webhooks_push_with_an_oidc_token_of_their_own_account(module: Module) -> None:
    subscription = module.resource("google_pubsub_subscription", "event_webhook")
    assert subscription["for_each"] == "${var.event_webhooks}"
    assert subscription["topic"] == '${google_pubsub_topic.topic["events"].id}'
    assert subscription["name"] == "mailpipe-events-${each.key}"
    assert subscription["expiration_policy"] == [{"ttl": ""}]
    [push] = subscription["push_config"]
    assert push["push_endpoint"] == "${each.value.endpoint}"
    assert push["oidc_token"] == [
        {
            "service_account_email": "${google_service_account.event_webhooks[0].email}",
            "audience": "${coalesce(each.value.audience, each.value.endpoint)}",
        }
    ]
    unwrapped = _dynamic(push, "no_wrapper")
    assert unwrapped["for_each"] == "${each.value.no_wrapper ? [true] : []}"
    assert unwrapped["content"] == [{"write_metadata": True}]

    minting = module.resource(
        "google_service_account_iam_member", "pubsub_agent_mints_event_webhook_tokens"
    )
    assert minting["role"] == "roles/iam.serviceAccountTokenCreator"
    assert minting["service_account_id"] == "${google_service_account.event_webhooks[0].name}"
    assert minting["member"] == "${local.pubsub_service_agent}"
    # The webhook identity is only named in tokens: no grant is made to it.
    grants = [
        f"{rtype}.{name}"
        for (rtype, name), body in module.resources.items()
        if "_iam_" in rtype and "event_webhooks" in str(body.get("member", ""))
    ]
    assert grants == []
    for rtype, name in (
        ("google_service_account", "event_webhooks"),
        ("google_service_account_iam_member", "pubsub_agent_mints_event_webhook_tokens"),
    ):
        assert module.resource(rtype, name)["count"] == "${local.event_webhooks_enabled ? 1 : 0}"


def test_every_event_webhook_dead_letters_after_bounded_retries(module: Module) -> None:
    """An endpoint that stays down must not lose events silently when the retention runs out:
    each webhook subscription backs off within Pub/Sub's limits for a bounded number of attempts,
    then forwards to the webhooks' dead-letter topic, whose subscription keeps them 7 days."""
    subscription = module.resource("google_pubsub_subscription", "event_webhook")
    assert subscription["retry_policy"] == [{"minimum_backoff": "10s", "maximum_backoff": "600s"}]
    assert subscription["dead_letter_policy"] == [
        {
            "dead_letter_topic": "${google_pubsub_topic.event_webhook_dead_letter[0].id}",
            "max_delivery_attempts": "${each.value.max_delivery_attempts}",
        }
    ]
    assert "max_delivery_attempts = optional(number, 100)" in module.variables["event_webhooks"][
        "type"
    ].replace("\n", " ")

    topic = module.resource("google_pubsub_topic", "event_webhook_dead_letter")
    held = module.resource("google_pubsub_subscription", "event_webhook_dead_letter")
    for body in (topic, held):
        assert body["count"] == "${local.event_webhooks_enabled ? 1 : 0}"
        assert body["name"] == "mailpipe-event-webhooks-dead-letter"
        assert body["message_retention_duration"] == "604800s"
    # Not a name a webhook's own subscription (mailpipe-events-NAME) can take.
    assert not held["name"].startswith("mailpipe-events-")
    assert held["topic"] == "${google_pubsub_topic.event_webhook_dead_letter[0].id}"
    assert held["expiration_policy"] == [{"ttl": ""}]
    assert "push_config" not in held, "dead letters wait for an operator; nothing pushes them"
    # The agent's grants on both ends:
    # test_every_dead_letter_subscription_has_the_service_agent_grants.


EVENT_WEBHOOK_CASES = [
    ({"crm": {"endpoint": "https://hooks.example.com/mailpipe"}}, True),
    ({"crm": {"endpoint": "https://hooks.example.com", "no_wrapper": True}}, True),
    ({"crm": {"endpoint": "https://h.example.com/x", "audience": "crm-events"}}, True),
    ({"crm": {"endpoint": "https://h.example.com/x", "event_types": ["bounced"]}}, True),
    ({"crm": {"endpoint": "http://hooks.example.com/mailpipe"}}, False),
    ({"crm": {"endpoint": "hooks.example.com/mailpipe"}}, False),
    ({"crm": {"endpoint": "https://user:secret@hooks.example.com/"}}, False),
    ({"crm": {"endpoint": "https://h.example.com/x", "audience": " "}}, False),
    ({"crm": {"endpoint": "https://h.example.com/x", "event_types": ["opened"]}}, False),
    ({"CRM_Hook": {"endpoint": "https://hooks.example.com/"}}, False),
    ({"crm": {"no_wrapper": True}}, False),
    ({"crm": {"endpoint": "https://h.example.com/x", "max_delivery_attempts": 5}}, True),
    ({"crm": {"endpoint": "https://h.example.com/x", "max_delivery_attempts": 4}}, False),
    ({"crm": {"endpoint": "https://h.example.com/x", "max_delivery_attempts": 101}}, False),
    ({"crm": {"endpoint": "https://h.example.com/x", "max_delivery_attempts": 7.5}}, False),
]


@pytest.mark.parametrize(
    ("value", "accepted"), EVENT_WEBHOOK_CASES, ids=[json.dumps(v) for v, _ in EVENT_WEBHOOK_CASES]
)
def test_event_webhooks_validation(
    module: Module, tmp_path: Path, value: dict[str, Any], accepted: bool
) -> None:
    ok, result = _evaluate(
        module, tmp_path, {"value": "var.event_webhooks"}, {"event_webhooks": value}
    )
    assert ok is accepted, result
    if not ok:
        assert "event_webhooks" in result


def test_event_webhook_filters_evaluated(module: Module, tmp_path: Path) -> None:
    ok, result = _evaluate(
        module,
        tmp_path,
        {"filters": "local.event_webhook_filters", "on": "local.event_webhooks_enabled"},
        {
            "event_webhooks": {
                "all": {"endpoint": "https://a.example.com/"},
                "problems": {
                    "endpoint": "https://b.example.com/",
                    "event_types": ["bounced", "dead_lettered"],
                },
            }
        },
    )
    assert ok, result
    assert result["on"] is True
    assert result["filters"] == {
        "all": None,
        "problems": 'attributes.event_type = "bounced" OR attributes.event_type = "dead_lettered"',
    }
    ok, result = _evaluate(module, tmp_path, {"on": "local.event_webhooks_enabled"})
    assert ok and result["on"] is False, result
    ok, result = _evaluate(
        module,
        tmp_path,
        {"attempts": "{for name, hook in var.event_webhooks : name => hook.max_delivery_attempts}"},
        {"event_webhooks": {"all": {"endpoint": "https://a.example.com/"}}},
    )
    assert ok and result["attempts"] == {"all": 100}, result


def test_suppression_list_key_ttl_and_indexes_are_wired(module: Module) -> None:
    """The HMAC key reaches both services only as a Secret Manager reference (and only where
    recipients are hashed); expired entries are deleted by a TTL policy on their own field."""
    suppression = module.locals["suppression_secret_env"]
    assert "local.suppression_key ?" in suppression and "MAILPIPE_SUPPRESSION_KEY" in suppression
    assert 'var.log_addresses != "full"' in module.locals["suppression_key"]
    assert module.locals["publisher_secret_env"] == "${local.suppression_secret_env}"
    assert "local.suppression_secret_env" in module.locals["subscriber_secret_env"]
    publisher = module.resource("google_cloud_run_v2_service", "publisher")
    plain, secret = publisher["template"][0]["containers"][0]["dynamic"]
    assert plain["env"]["for_each"] == "${local.publisher_env}"
    assert secret["env"]["for_each"] == "${local.publisher_secret_env}"
    ref = secret["env"]["content"][0]["value_source"][0]["secret_key_ref"][0]
    assert ref == {"secret": "${env.value.secret}", "version": "${env.value.version}"}
    readers = module.resource("google_secret_manager_secret_iam_member", "reads_suppression_key")
    assert readers["role"] == "roles/secretmanager.secretAccessor"
    assert readers["for_each"] == "${local.suppression_key ? local.services_members : {}}"
    assert module.locals["services_members"] == {
        "publisher": "${google_service_account.publisher.member}",
        "subscriber": "${google_service_account.subscriber.member}",
    }
    for rtype, name in (
        ("google_cloud_run_v2_service", "publisher"),
        ("google_cloud_run_v2_service", "subscriber"),
        ("google_cloud_run_v2_worker_pool", "subscriber"),
    ):
        assert (
            "${google_secret_manager_secret_iam_member.reads_suppression_key}"
            in (module.resource(rtype, name)["depends_on"])
        ), f"{rtype}.{name} must wait for its access to the key"
    assert module.locals["suppressions_ttl_field"] == "expires_at"  # record_ttl's third entry
    defaults = inspect.signature(FirestoreRecord.__init__).parameters
    assert module.locals["suppressions_collection"] == defaults["suppressions_collection"].default
    indexes = module.resource("google_firestore_index", "suppressions_by_filter")
    assert indexes["for_each"] == '${toset(["reason", "domain"])}'
    for name in ("log_addresses", "suppression_key_secret"):
        assert module.variables[name].get("validation"), f"{name} must be validated"


def test_operators_may_pull_the_webhook_dead_letters_their_alert_points_at(module: Module) -> None:
    """The webhook dead-letter alert's runbook (docs/events.md) has an operator pull and ack
    mailpipe-event-webhooks-dead-letter: var.operators hold the subscriber role on it too."""
    subscriptions = module.locals["operator_subscriptions"]
    assert "local.event_webhooks_enabled ?" in subscriptions
    assert "google_pubsub_subscription.event_webhook_dead_letter[0].name" in subscriptions
    assert "for key, _ in local.pull_subscriptions" in subscriptions  # and every pull one
    grant = module.resource("google_pubsub_subscription_iam_member", "operators_pull")
    assert "keys(local.operator_subscriptions), var.operators" in grant["for_each"]
    assert grant["subscription"] == "${local.operator_subscriptions[each.value.subscription]}"
    assert grant["role"] == "roles/pubsub.subscriber"
