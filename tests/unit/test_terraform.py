"""Offline checks of the GCP deployment (terraform/) and the Dockerfiles.

`terraform init/validate/plan` need the google provider from the registry, which CI cannot reach, so
these tests check what can be checked without it:

- every .tf file parses (python-hcl2) and every google_* argument/block exists in the provider
  schema (shared/tools/tf-schema-check, google 8.7.0);
- checkov finds no failed check, and every skip carries a justification;
- the wiring that breaks a deployment silently when wrong: dead-letter IAM for the Pub/Sub service
  agent, OIDC on push, no public access, timeouts vs. ack deadline, the services' env names;
- Terraform reads the same topology declaration as the emulator: evaluated by a real `terraform
  console` (locals only, no provider needed) when the binary exists, compared with load_topology().

Nothing here talks to Google Cloud; terraform and checkov run with their network features off.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest
from packaging.specifiers import SpecifierSet

import mailpipe.record.firestore as firestore_record_module
from mailpipe.config import SmtpConfig
from mailpipe.record.firestore import FirestoreRecord
from mailpipe.serving import serve_wsgi
from mailpipe.topology import Topology, default_topology_path, duration_seconds, load_topology

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
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


# ------------------------------------------------------------------------------------------------
# A small model of the root module, from python-hcl2's output
# ------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """python-hcl2 output without its bookkeeping keys, labels and string literals unquoted."""
    if isinstance(value, dict):
        return {
            _unquote(k): _clean(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return _unquote(value)


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _parse(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return _clean(hcl2.load(handle))


class Module:
    """Resources, variables, locals and outputs of one Terraform module directory."""

    def __init__(self, directory: Path) -> None:
        self.files = sorted(directory.glob("*.tf"))
        self.text = "\n".join(path.read_text(encoding="utf-8") for path in self.files)
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.data: dict[tuple[str, str], dict[str, Any]] = {}
        self.variables: dict[str, dict[str, Any]] = {}
        self.locals: dict[str, Any] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.by_file: dict[str, dict[str, Any]] = {}
        for path in self.files:
            doc = _parse(path)
            self.by_file[path.name] = doc
            for entry in doc.get("resource", []):
                for rtype, named in entry.items():
                    for name, body in named.items():
                        self.resources[(rtype, name)] = body
            for entry in doc.get("data", []):
                for dtype, named in entry.items():
                    for name, body in named.items():
                        self.data[(dtype, name)] = body
            for entry in doc.get("variable", []):
                self.variables.update(entry)
            for entry in doc.get("locals", []):
                self.locals.update(entry)
            for entry in doc.get("output", []):
                self.outputs.update(entry)

    def resource(self, rtype: str, name: str) -> dict[str, Any]:
        assert (rtype, name) in self.resources, f"terraform/ has no {rtype}.{name}"
        return self.resources[(rtype, name)]

    def of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: body for (t, name), body in self.resources.items() if t == rtype}


def _dynamic(body: dict[str, Any], block: str) -> dict[str, Any]:
    """The `dynamic "<block>"` of a resource body (for_each + content)."""
    for entry in body.get("dynamic", []):
        if block in entry:
            return entry[block]
    raise AssertionError(f"no dynamic {block!r} block")


def _strings(value: Any) -> list[str]:
    """Every string anywhere inside a parsed value."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.fixture(scope="module")
def module() -> Module:
    return Module(TERRAFORM)


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load_topology()


def _terraform() -> str | None:
    return shutil.which("terraform")


# ------------------------------------------------------------------------------------------------
# Syntax and schema
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(TERRAFORM.rglob("*.tf")), ids=lambda p: str(p.relative_to(TERRAFORM))
)
def test_every_tf_file_parses(path: Path) -> None:
    assert _parse(path), f"{path} parsed to nothing"


def test_every_google_argument_and_block_exists_in_the_provider_schema() -> None:
    if not TF_SCHEMA_CHECK.is_file():
        pytest.fail(
            f"tf-schema-check not found at {TF_SCHEMA_CHECK}: CI checks out shared/ beside the "
            "repository; locally, put the shared tools there (../shared/tools/tf-schema-check)."
        )
    result = subprocess.run(  # the checker needs python-hcl2, which this interpreter has
        [sys.executable, str(TF_SCHEMA_CHECK), str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"tf-schema-check found problems:\n{result.stdout}{result.stderr}"
    )
    assert "0 problem(s)" in result.stdout


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
    pytest.fail(f"checkov is not installed; from the repository root run: {CHECKOV_INSTALL}")


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
    assert list(topics) == ["topic"], "one for_each topic resource, no hand-written extras"
    assert list(subscriptions) == ["subscription"]
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


def test_every_dead_letter_subscription_has_the_service_agent_grants(module: Module) -> None:
    agent = module.locals["pubsub_service_agent"]
    assert agent == (
        "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    )
    sub = module.resource("google_pubsub_subscription", "subscription")
    policy = _dynamic(sub, "dead_letter_policy")
    assert policy["for_each"] == "${each.value.dead_letter == null ? [] : [each.value.dead_letter]}"
    # The grants iterate over exactly the subscriptions that get a dead_letter_policy...
    assert "sub.dead_letter != null" in module.locals["dead_letter_subscriptions"]

    publish = module.resource(
        "google_pubsub_topic_iam_member", "pubsub_agent_publishes_dead_letters"
    )
    assert publish["for_each"] == "${local.dead_letter_subscriptions}"
    assert publish["role"] == "roles/pubsub.publisher"
    assert publish["member"] == "${local.pubsub_service_agent}"
    # ...on the topic the policy forwards to...
    assert publish["topic"] == "${google_pubsub_topic.topic[each.value.dead_letter.topic].name}"
    assert policy["content"][0]["dead_letter_topic"] == (
        "${google_pubsub_topic.topic[dead_letter_policy.value.topic].id}"
    )

    ack = module.resource("google_pubsub_subscription_iam_member", "pubsub_agent_acks_dead_letters")
    assert ack["for_each"] == "${local.dead_letter_subscriptions}"
    assert ack["role"] == "roles/pubsub.subscriber"
    assert ack["member"] == "${local.pubsub_service_agent}"
    # ...and on the source subscription itself.
    assert ack["subscription"] == "${google_pubsub_subscription.subscription[each.key].name}"


# ------------------------------------------------------------------------------------------------
# Push: OIDC from a dedicated invoker, checked by Cloud Run and by the subscriber
# ------------------------------------------------------------------------------------------------


def test_push_uses_an_oidc_token_from_the_invoker_account(module: Module) -> None:
    push = _dynamic(module.resource("google_pubsub_subscription", "subscription"), "push_config")
    assert push["for_each"] == '${each.value.delivery == "push" ? [each.value] : []}'
    content = push["content"][0]
    assert content["push_endpoint"] == (
        "${google_cloud_run_v2_service.subscriber.uri}${push_config.value.push_path}"
    )
    assert content["oidc_token"] == [
        {
            "service_account_email": "${google_service_account.push_invoker.email}",
            "audience": "${local.push_audience}",
        }
    ]

    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    assert subscriber["custom_audiences"] == ["${local.push_audience}"]
    env = module.locals["subscriber_env"]
    assert "MAILPIPE_PUSH_AUDIENCE = local.push_audience" in env
    assert "MAILPIPE_PUSH_SERVICE_ACCOUNT = google_service_account.push_invoker.email" in env

    invoker = module.resource(
        "google_cloud_run_v2_service_iam_member", "push_invoker_calls_subscriber"
    )
    assert invoker["role"] == "roles/run.invoker"
    assert invoker["name"] == "${google_cloud_run_v2_service.subscriber.name}"
    assert invoker["member"] == "${google_service_account.push_invoker.member}"

    token_creator = module.resource(
        "google_service_account_iam_member", "pubsub_agent_mints_invoker_tokens"
    )
    assert token_creator["role"] == "roles/iam.serviceAccountTokenCreator"
    assert token_creator["service_account_id"] == "${google_service_account.push_invoker.name}"
    assert token_creator["member"] == "${local.pubsub_service_agent}"


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
# Timeouts: request timeout <= ack deadline; SMTP timeout fits inside the request
# ------------------------------------------------------------------------------------------------


def test_subscriber_timeout_fits_the_ack_deadline(module: Module, topology: Topology) -> None:
    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    assert subscriber["template"][0]["timeout"] == "${local.subscriber_timeout_seconds}s"
    assert module.locals["subscriber_timeout_seconds"] == (
        "${coalesce(var.subscriber_request_timeout_seconds, local.min_push_ack_deadline)}"
    )
    assert module.variables["subscriber_request_timeout_seconds"].get("default") is None
    conditions = [p["condition"] for p in subscriber["lifecycle"][0]["precondition"]]
    assert "${local.subscriber_timeout_seconds <= local.min_push_ack_deadline}" in conditions
    assert "${var.smtp_timeout_seconds < local.subscriber_timeout_seconds}" in conditions

    # With the defaults, the numbers themselves:
    push = [s for s in topology.subscriptions.values() if s.delivery == "push"]
    assert push, "the declaration has no push subscription"
    request_timeout = min(s.ack_deadline_seconds for s in push)
    smtp_timeout = module.variables["smtp_timeout_seconds"]["default"]
    assert smtp_timeout == SmtpConfig().timeout, "Terraform's default must be the service's default"
    assert smtp_timeout < request_timeout <= topology.delivery_subscription.ack_deadline_seconds


def test_concurrency_fits_the_server_threads(module: Module) -> None:
    threads = inspect.signature(serve_wsgi).parameters["threads"].default
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


def _env_names(expression: Any) -> set[str]:
    if isinstance(expression, dict):
        return set(expression)
    return set(ENV_NAME.findall(str(expression)))


def test_env_names_are_the_ones_the_services_read(module: Module) -> None:
    config_source = (REPO / "mailpipe" / "config.py").read_text(encoding="utf-8")
    common = _env_names(module.locals["common_env"])
    subscriber = common | _env_names(module.locals["subscriber_env"])
    secret = _env_names(module.locals["subscriber_secret_env"])
    assert module.locals["publisher_env"] == "${local.common_env}"
    for name in common | subscriber | secret:
        assert f'"{name}"' in config_source, f"{name} is not read by mailpipe/config.py"
    assert {
        "GOOGLE_CLOUD_PROJECT",
        "MAILPIPE_TOPIC",
        "MAILPIPE_SUBSCRIPTION",
        "MAILPIPE_DEAD_LETTER_TOPIC",
        "MAILPIPE_DEAD_LETTER_SUBSCRIPTION",
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
        "MAILPIPE_PUSH_AUDIENCE",
        "MAILPIPE_PUSH_SERVICE_ACCOUNT",
    } <= subscriber
    assert secret == {"MAILPIPE_SMTP_PASSWORD"}
    plain_env = str(module.locals["common_env"]) + module.locals["subscriber_env"]
    assert not re.search(r"(?<![A-Z_])PORT\s*=", plain_env), "Cloud Run sets PORT (reserved name)"
    assert module.locals["common_env"]["MAILPIPE_TRACES"] == "gcp"
    assert module.locals["common_env"]["MAILPIPE_RECORD"] == "firestore://${var.firestore_database}"


def test_smtp_password_only_comes_from_secret_manager(module: Module) -> None:
    subscriber = module.resource("google_cloud_run_v2_service", "subscriber")
    container = subscriber["template"][0]["containers"][0]
    plain, secret = container["dynamic"]
    assert plain["env"]["for_each"] == "${local.subscriber_env}"
    assert "MAILPIPE_SMTP_PASSWORD" not in module.locals["subscriber_env"]
    assert secret["env"]["for_each"] == "${local.subscriber_secret_env}"
    ref = secret["env"]["content"][0]["value_source"][0]["secret_key_ref"][0]
    assert ref == {"secret": "${env.value.secret}", "version": "${env.value.version}"}
    assert "value" not in secret["env"]["content"][0]
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
    assert ttl["for_each"] == (
        "${toset([local.record_collection, local.record_idempotency_collection])}"
    )
    assert ttl["collection"] == "${each.value}"
    assert ttl["field"] == "${local.record_ttl_field}"
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

    dead = module.resource("google_monitoring_alert_policy", "dead_letters")
    threshold = dead["conditions"][0]["condition_threshold"][0]
    assert "subscription/num_undelivered_messages" in threshold["filter"]
    assert "local.dead_letter_subscription_filter" in threshold["filter"]
    assert (threshold["comparison"], threshold["threshold_value"]) == ("COMPARISON_GT", 0)

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


def test_variables_and_outputs_are_typed_and_described(module: Module) -> None:
    for name, body in module.variables.items():
        assert body.get("type"), f"variable {name} has no type"
        assert len(body.get("description", "")) > 10, f"variable {name} has no description"
    for name, body in module.outputs.items():
        assert len(body.get("description", "")) > 10, f"output {name} has no description"
        assert "sensitive" not in body, f"output {name}: secrets are never output"
    assert {"publisher_url", "publisher_env", "subscriber_env"} <= set(module.outputs)


def test_terraform_fmt_is_clean() -> None:
    terraform = _terraform()
    if terraform is None:
        pytest.skip("terraform binary not found: `terraform fmt -check` not run")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=OFFLINE_ENV,
    )
    assert result.returncode == 0, f"run `terraform fmt -recursive terraform/`:\n{result.stdout}"


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("publisher", '["python", "-m", "publisher"]'),
        ("subscriber", '["python", "-m", "subscriber", "push"]'),
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
    env = " ".join(
        line for line in lines if line.startswith(("ENV ", "MAILPIPE_", "PORT", "PYTHON"))
    )
    assert "MAILPIPE_HTTP_HOST=0.0.0.0" in env
    assert '"MAILPIPE_HTTP_HOST"' in (REPO / "mailpipe" / "config.py").read_text(encoding="utf-8")
    installs = [line for line in lines if "pip install" in line]
    assert installs == ["RUN pip install --no-cache-dir ."], "install the project only, no extras"
    copies = " ".join(line for line in lines if line.startswith("COPY "))
    other = "subscriber" if service == "publisher" else "publisher"
    assert f"{service}/" in copies and f"{other}/" not in copies, "one service per image"


def test_dockerignore_lets_only_the_sources_in() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "mailpipe", "publisher", "subscriber"}


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
