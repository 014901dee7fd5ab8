# mailpipe on Google Cloud: client -HTTP-> publisher (Cloud Run) -Pub/Sub push-> subscriber (Cloud Run)
# -SMTP-> relay, delivery record in Firestore, traces in Cloud Trace, alerts in Cloud Monitoring.
#
# Resources are split by concern:
#   apis.tf        the APIs this deployment uses
#   topology.tf    the topology declaration (mailpipe/topology.json), read once
#   pubsub.tf      topics, subscriptions (push with OIDC, retry, dead letter), Pub/Sub service agent grants
#   iam.tf         one service account per service, least-privilege roles (a comment per role)
#   run.tf         the two Cloud Run services and who may invoke them
#   firestore.tf   the delivery record's database, TTL policy and index
#   registry.tf    the Artifact Registry repository for the images
#   monitoring.tf  alert policies
# The environment variables of both services are built here, once, and also exported as outputs.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  publisher_service_name  = "mailpipe-publisher"
  subscriber_service_name = "mailpipe-subscriber"

  # The delivery record's collections and their TTL field (mailpipe/record/firestore.py defaults):
  # one document per mail, and one per idempotency key.
  record_collection             = "mailpipe_mails"
  record_idempotency_collection = "mailpipe_idempotency"
  record_ttl_field              = "expire_at"

  # Google-managed identity that delivers push requests and forwards messages to dead-letter topics.
  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  push_audience = coalesce(var.push_audience, "mailpipe-push:${var.project_id}:${local.delivery_subscription_name}")

  # Cloud Run must answer (or time out) before Pub/Sub's ack deadline: otherwise Pub/Sub pushes the
  # same mail again while the first delivery is still talking to the relay.
  min_push_ack_deadline      = min([for sub in values(local.push_subscriptions) : sub.ack_deadline_seconds]...)
  subscriber_timeout_seconds = coalesce(var.subscriber_request_timeout_seconds, local.min_push_ack_deadline)

  smtp_auth     = var.smtp_password_secret_id != null
  smtp_port     = coalesce(var.smtp_port, { starttls = 587, implicit = 465, none = 25 }[var.smtp_tls])
  firestore_loc = coalesce(var.firestore_location, var.region)

  # Environment shared by both services (names: mailpipe/config.py). PORT is set by Cloud Run itself
  # (it is a reserved name there), so it is not listed.
  common_env = {
    GOOGLE_CLOUD_PROJECT              = var.project_id
    MAILPIPE_TOPIC                    = local.mail_topic_name
    MAILPIPE_SUBSCRIPTION             = local.delivery_subscription_name
    MAILPIPE_DEAD_LETTER_TOPIC        = local.dead_letter_topic_name
    MAILPIPE_DEAD_LETTER_SUBSCRIPTION = local.dead_letter_subscription_name
    MAILPIPE_RECORD                   = "firestore://${var.firestore_database}"
    MAILPIPE_TRACES                   = "gcp"
    MAILPIPE_TRACE_SAMPLE_RATIO       = tostring(var.trace_sample_ratio)
  }

  publisher_env = local.common_env

  subscriber_env = merge(local.common_env, {
    MAILPIPE_SMTP_HOST            = var.smtp_host
    MAILPIPE_SMTP_PORT            = tostring(local.smtp_port)
    MAILPIPE_SMTP_TLS             = var.smtp_tls
    MAILPIPE_SMTP_TIMEOUT         = tostring(var.smtp_timeout_seconds)
    MAILPIPE_SMTP_POOL_SIZE       = tostring(var.smtp_pool_size)
    MAILPIPE_MESSAGE_ID_DOMAIN    = var.message_id_domain
    MAILPIPE_PUSH_AUDIENCE        = local.push_audience
    MAILPIPE_PUSH_SERVICE_ACCOUNT = google_service_account.push_invoker.email
    }, local.smtp_auth ? {
    MAILPIPE_SMTP_USERNAME = var.smtp_username
  } : {})

  # Secret-backed variables: name => Secret Manager reference. Only the reference is here; Cloud Run
  # resolves the value at instance start-up, so it is never in Terraform's state.
  subscriber_secret_env = local.smtp_auth ? {
    MAILPIPE_SMTP_PASSWORD = {
      secret  = var.smtp_password_secret_id
      version = var.smtp_password_secret_version
    }
  } : {}

  labels = merge(var.labels, { app = "mailpipe" })
}
