# mailpipe on Google Cloud: client -HTTP-> publisher (Cloud Run) -Pub/Sub push-> subscriber (Cloud Run)
# -SMTP-> relay, delivery record in Firestore, traces in Cloud Trace, alerts in Cloud Monitoring.
# With subscriber_mode = "pull" the subscriber is a Cloud Run worker pool pulling instead.
#
# Resources are split by concern:
#   apis.tf        the APIs this deployment uses
#   topology.tf    the topology declaration (mailpipe/topology.json), read once
#   pubsub.tf      topics, subscriptions (push with OIDC, retry, dead letter), Pub/Sub service agent grants
#   iam.tf         one service account per service, least-privilege roles (a comment per role)
#   run.tf         the publisher and subscriber (Cloud Run service, or worker pool in pull mode)
#   firestore.tf   the delivery record's database, TTL policy and index
#   registry.tf    the Artifact Registry repository for the images
#   monitoring.tf  alert policies
#   canary.tf      the canary job, its schedule and alert (optional)
#   cli_jobs.tf    the scheduled CLI jobs: `mailpipe reconcile --fix`, `mailpipe dlq replay --due`
#   schedules.tf   Cloud Scheduler starting the jobs
#   events.tf      delivery events: publishers, integrators' webhooks and their dead-letter topic
# The environment variables of both services are built here, once, and also exported as outputs.

locals {
  publisher_service_name  = "mailpipe-publisher"
  subscriber_service_name = "mailpipe-subscriber"

  # The delivery record's collections and their TTL field (mailpipe/record/firestore.py defaults):
  # one document per mail, and one per idempotency key.
  record_collection             = "mailpipe_mails"
  record_idempotency_collection = "mailpipe_idempotency"
  record_ttl_field              = "expire_at"
  # The suppression list: one document per recipient, deleted after its own expires_at (if any).
  suppressions_collection = "mailpipe_suppressions"
  suppressions_ttl_field  = "expires_at"
  # Recipients are keyed by an HMAC under this secret unless full addresses may be kept.
  suppression_key = var.log_addresses != "full" && var.suppression_key_secret != null

  # Google-managed identity that delivers push requests and forwards messages to dead-letter topics,
  # as Service Usage reports it (pubsub.tf), not an address built by hand.
  pubsub_service_agent = google_project_service_identity.pubsub.member

  push_mode = var.subscriber_mode == "push"
  pull_mode = var.subscriber_mode == "pull"

  # The subscriptions the subscriber consumes: those topology.json declares push (the mail and the
  # dead-letter record subscriptions). In pull mode they are created without a push config and the
  # worker pulls them (`python -m subscriber pull` reads both).
  subscriber_subscriptions = local.push_subscriptions

  push_audience = coalesce(var.push_audience, "mailpipe-push:${var.project_id}:${local.delivery_subscription_name}")

  # Cloud Run must answer (or time out) before Pub/Sub's ack deadline: otherwise Pub/Sub pushes the
  # same mail again while the first delivery is still talking to the relay.
  min_push_ack_deadline      = min([for sub in values(local.push_subscriptions) : sub.ack_deadline_seconds]...)
  subscriber_timeout_seconds = coalesce(var.subscriber_request_timeout_seconds, local.min_push_ack_deadline)
  # A delivery's claim in the record lasts the delivery subscription's ack deadline
  # (MAILPIPE_DELIVERY_LEASE_SECONDS' default); a delivery must end before it in either mode.
  delivery_lease_seconds = local.subscriptions["delivery"].ack_deadline_seconds

  smtp_auth     = var.smtp_password_secret_id != null
  smtp_port     = coalesce(var.smtp_port, { starttls = 587, implicit = 465, none = 25 }[var.smtp_tls])
  firestore_loc = coalesce(var.firestore_location, var.region)

  # Environment shared by both services (names: mailpipe/config.py). PORT is set by Cloud Run itself
  # (it is a reserved name there), so it is not listed.
  common_env = {
    GOOGLE_CLOUD_PROJECT        = var.project_id
    MAILPIPE_TOPIC              = local.mail_topic_name
    MAILPIPE_SUBSCRIPTION       = local.delivery_subscription_name
    MAILPIPE_RECORD             = "firestore://${var.firestore_database}"
    MAILPIPE_TRACES             = "gcp"
    MAILPIPE_TRACE_SAMPLE_RATIO = tostring(var.trace_sample_ratio)
    MAILPIPE_LOG_ADDRESSES      = var.log_addresses
  }

  publisher_env = merge(local.common_env, {
    MAILPIPE_ALLOWED_SENDER_DOMAINS          = join(",", var.allowed_sender_domains)
    MAILPIPE_SANDBOX_CALLERS                 = join(",", var.sandbox_callers)
    MAILPIPE_PUBLISH_TIMEOUT                 = tostring(var.publish_timeout_seconds)
    MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS = tostring(var.idempotency_reservation_seconds)
    MAILPIPE_RECONCILE_GRACE_SECONDS         = tostring(var.reconcile_grace_seconds)
  })

  subscriber_env = merge(local.common_env, {
    MAILPIPE_SMTP_HOST         = var.smtp_host
    MAILPIPE_SMTP_PORT         = tostring(local.smtp_port)
    MAILPIPE_SMTP_TLS          = var.smtp_tls
    MAILPIPE_SMTP_TIMEOUT      = tostring(var.smtp_timeout_seconds)
    MAILPIPE_SMTP_POOL_SIZE    = tostring(var.smtp_pool_size)
    MAILPIPE_SMTP_POOL_WAIT    = tostring(var.smtp_pool_wait_seconds)
    MAILPIPE_DELIVERY_TIMEOUT  = tostring(var.delivery_timeout_seconds)
    MAILPIPE_MESSAGE_ID_DOMAIN = var.message_id_domain
    }, local.push_mode ? {
    # Cloud Run IAM (run.invoker for the push invoker only) verifies the Pub/Sub OIDC token and
    # strips its signature before the request reaches the container; the subscriber then checks
    # the token's claims: this audience and this invoker's email.
    MAILPIPE_PUSH_AUTH            = "cloud-run"
    MAILPIPE_PUSH_AUDIENCE        = local.push_audience
    MAILPIPE_PUSH_SERVICE_ACCOUNT = google_service_account.push_invoker[0].email
    } : {}, local.smtp_auth ? {
    MAILPIPE_SMTP_USERNAME = var.smtp_username
  } : {})

  # Secret-backed variables: name => Secret Manager reference. Only the reference is here; Cloud Run
  # resolves the value at instance start-up, so it is never in Terraform's state.
  suppression_secret_env = local.suppression_key ? {
    MAILPIPE_SUPPRESSION_KEY = { secret = var.suppression_key_secret.id, version = var.suppression_key_secret.version }
  } : {}
  publisher_secret_env = local.suppression_secret_env
  subscriber_secret_env = merge(local.smtp_auth ? {
    MAILPIPE_SMTP_PASSWORD = {
      secret  = var.smtp_password_secret_id
      version = var.smtp_password_secret_version
    }
  } : {}, local.suppression_secret_env)

  labels = merge(var.labels, { app = "mailpipe" })
}
