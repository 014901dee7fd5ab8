# One service account per service, plus one that only exists to sign Pub/Sub push requests.
# Every role is granted on the narrowest resource that has it; project-level grants are the roles
# that exist only at project level (trace and metric writing) or are narrowed by an IAM condition.

resource "google_service_account" "publisher" {
  project      = var.project_id
  account_id   = "mailpipe-publisher"
  display_name = "mailpipe publisher (Cloud Run)"
  description  = "Runs the publisher: publishes mails to the mail topic, keeps the delivery record."

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "subscriber" {
  project      = var.project_id
  account_id   = "mailpipe-subscriber"
  display_name = "mailpipe subscriber (Cloud Run)"
  description  = "Runs the subscriber: delivers pushed or pulled mails over SMTP, keeps the delivery record."

  depends_on = [google_project_service.enabled]
}

# Push mode only: nothing signs push requests when the subscriber pulls.
resource "google_service_account" "push_invoker" {
  count = local.push_mode ? 1 : 0

  project      = var.project_id
  account_id   = "mailpipe-push-invoker"
  display_name = "mailpipe Pub/Sub push invoker"
  description  = "Identity in the OIDC token of Pub/Sub push requests to the subscriber; may only invoke it."

  depends_on = [google_project_service.enabled]
}

# --- Publisher -------------------------------------------------------------------------------------

# Publish accepted mails to the mail topic, and to nothing else.
resource "google_pubsub_topic_iam_member" "publisher_publishes_mail" {
  project = var.project_id
  topic   = google_pubsub_topic.topic["mail"].name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.publisher.member
}

# --- Both services (and the CLI jobs and operators where they need the same) ------------------------

locals {
  services_members = {
    publisher  = google_service_account.publisher.member
    subscriber = google_service_account.subscriber.member
  }

  # Spans and metrics: the services and the CLI jobs that export them (cli_jobs.tf).
  runtime_members = merge(local.services_members, {
    for name, member in local.cli_job_members : name => member if local.cli_jobs[name].exports_telemetry
  })

  # The delivery record: the services, every CLI job and the operators (`mailpipe status`, `dlq`).
  # An operator is keyed by the member itself, the key its grant had before this map.
  record_users = merge(local.services_members, local.cli_job_members, { for member in var.operators : member => member })

  # Firestore grants are limited to the mailpipe database with an IAM condition on its resource name
  # (Firestore "per-database access", cloud.google.com/firestore/docs/manage-databases).
  firestore_database_name = "projects/${var.project_id}/databases/${var.firestore_database}"
}

# Read and write the delivery record: the publisher reserves idempotency keys, marks mails queued
# and answers the status API; the subscriber claims attempts and records outcomes; reconcile
# rewrites stuck records and dlq-replay marks mails replayed or expired (both in transactions, like
# the services); operators run `mailpipe status` and `dlq` with it. roles/datastore.user is the
# smallest predefined role with entity read/write (no index or database administration), and only
# on the mailpipe database.
resource "google_project_iam_member" "record_access" {
  for_each = local.record_users

  project = var.project_id
  role    = "roles/datastore.user"
  member  = each.value

  condition {
    title       = "mailpipe-record-only"
    description = "Only the mailpipe Firestore database."
    expression  = "resource.name == \"${local.firestore_database_name}\""
  }
}

# Addresses of the record grant when the services, the reconcile job and the operators each had
# their own copy. The operators' keys are their members, so their whole resource moves at once.
moved {
  from = google_project_iam_member.operators_record_access
  to   = google_project_iam_member.record_access
}
moved {
  from = google_project_iam_member.runtime_record_access["publisher"]
  to   = google_project_iam_member.record_access["publisher"]
}
moved {
  from = google_project_iam_member.runtime_record_access["subscriber"]
  to   = google_project_iam_member.record_access["subscriber"]
}
moved {
  from = google_project_iam_member.runtime_record_access["dlq-replay"]
  to   = google_project_iam_member.record_access["dlq-replay"]
}
moved {
  from = google_project_iam_member.reconcile_record_access[0]
  to   = google_project_iam_member.record_access["reconcile"]
}

# Write spans to Cloud Trace (MAILPIPE_TRACES=gcp). Project-level: the role has no narrower scope.
resource "google_project_iam_member" "runtime_trace_writer" {
  for_each = local.runtime_members

  project = var.project_id
  role    = "roles/cloudtrace.agent"
  member  = each.value
}

# Write the OpenTelemetry metrics (mailpipe.mails.*) that drive the error-ratio alert. Project-level
# only; write-only, cannot read or change metrics or alerts.
resource "google_project_iam_member" "runtime_metric_writer" {
  for_each = local.runtime_members

  project = var.project_id
  role    = "roles/monitoring.metricWriter"
  member  = each.value
}

# Logs need no grant: Cloud Run collects stdout/stderr itself.

# --- Subscriber ------------------------------------------------------------------------------------

# Read the SMTP password, and only that secret, when Cloud Run starts an instance.
data "google_secret_manager_secret" "smtp_password" {
  count = local.smtp_auth ? 1 : 0

  project   = var.project_id
  secret_id = var.smtp_password_secret_id
}

# secretAccessor on that one secret only, for the subscriber's identity only.
resource "google_secret_manager_secret_iam_member" "subscriber_reads_smtp_password" {
  count = local.smtp_auth ? 1 : 0

  project   = var.project_id
  secret_id = data.google_secret_manager_secret.smtp_password[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.subscriber.member
}

# The suppression list's HMAC key (MAILPIPE_SUPPRESSION_KEY), only where recipients are hashed.
data "google_secret_manager_secret" "suppression_key" {
  count = local.suppression_key ? 1 : 0

  project   = var.project_id
  secret_id = var.suppression_key_secret.id
}

# secretAccessor on that one secret, for the two services that key recipients with it: the
# publisher (the /v1/suppressions API) and the subscriber (lookups before sending, auto-add).
resource "google_secret_manager_secret_iam_member" "reads_suppression_key" {
  for_each = local.suppression_key ? local.services_members : {}

  project   = var.project_id
  secret_id = data.google_secret_manager_secret.suppression_key[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value
}

# --- Push path -------------------------------------------------------------------------------------

# The Pub/Sub service agent mints OIDC tokens for the invoker account (required for authenticated
# push, cloud.google.com/pubsub/docs/authenticate-push-subscriptions). Granted on that one account,
# not project-wide.
resource "google_service_account_iam_member" "pubsub_agent_mints_invoker_tokens" {
  count = local.push_mode ? 1 : 0

  service_account_id = google_service_account.push_invoker[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent
}

# The invoker may call the subscriber service and nothing else (see run.tf).

# --- Pull path (subscriber_mode = "pull") ---------------------------------------------------------

# Pull (and ack, nack, extend the ack deadline of) the mails of the subscriptions the worker consumes:
# the delivery subscription and the dead-letter record subscription (`python -m subscriber pull`
# reads both), granted on each of those subscriptions only: no other subscription, no topic, no
# project-level Pub/Sub role.
resource "google_pubsub_subscription_iam_member" "subscriber_pulls" {
  for_each = local.pull_mode ? local.subscriber_subscriptions : {}

  project      = var.project_id
  subscription = google_pubsub_subscription.subscription[each.key].name
  role         = "roles/pubsub.subscriber"
  member       = google_service_account.subscriber.member
}
