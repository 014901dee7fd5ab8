# The scheduled Cloud Run jobs that run the mailpipe CLI (ops/cli) from the publisher image with the
# publisher's configuration, one for_each keyed by job name (its schedule: schedules.tf):
#
# - reconcile (`mailpipe reconcile --fix`, every 10 minutes by default, var.reconcile) finds delivery
#   records stuck mid-way, an idempotency reservation still `accepting` past its expiry (the
#   publisher died between reserving the key and publishing) or a mail still `sending` past its
#   lease plus a grace period (the subscriber died mid-delivery), and settles them, so a client's
#   retry is not refused forever and `mailpipe status` tells the truth. It talks to Firestore only.
# - dlq-replay (`mailpipe dlq replay --due`, every var.dlq_replay.every_minutes minutes): retries
#   beyond Pub/Sub's (docs/deliver-by.md). Each pass republishes the dead-lettered mails whose next
#   attempt (the subscriber's retry schedule) has come, expires those past their deliver_by, and
#   leaves the rest on the dead-letter subscription.
#
# Each job runs as its own service account holding only what that job needs.

locals {
  # name => the job mailpipe-NAME, run as the account mailpipe-NAME, started by the scheduler
  # mailpipe-NAME-scheduler (the command: `mailpipe ARGS...`).
  cli_job_declarations = {
    reconcile = {
      enabled         = var.reconcile.enabled
      args            = ["reconcile", "--fix"]
      image           = var.reconcile.image
      timeout_seconds = var.reconcile.timeout_seconds
      schedule        = var.reconcile.schedule
      # A repair is idempotent: a failed run may be retried once.
      max_retries = 1
      # Reads the publisher's configuration (ops/cli/reconcile.py: the record, the reservation
      # expiry, the grace), so both always agree on what "stuck" means. Its JSON lines go to Cloud
      # Logging from stdout; it exports no spans or metrics, so it gets no Trace or Monitoring role.
      exports_telemetry = false
      description       = "Runs `mailpipe reconcile --fix`: reads and repairs stuck records in the delivery record."
    }
    dlq-replay = {
      enabled         = var.dlq_replay.enabled
      args            = ["dlq", "replay", "--due", "--json"]
      image           = var.dlq_replay.image
      timeout_seconds = var.dlq_replay.timeout_seconds
      schedule        = "*/${var.dlq_replay.every_minutes} * * * *"
      # None: Cloud Run's timeout is per attempt, so a retry could run into the next scheduled
      # pass (timeout_seconds <= every_minutes * 60 holds for one attempt); that pass is the retry.
      max_retries = 0
      # Reads the publisher's configuration (topics, dead-letter subscription, record) and exports
      # its replay spans and metrics as the services do.
      exports_telemetry = true
      description       = "Runs `mailpipe dlq replay --due`: republishes due dead-lettered mails, expires those past deliver_by."
    }
  }
  cli_jobs = { for name, job in local.cli_job_declarations : name => job if job.enabled }

  cli_job_members = { for name, account in google_service_account.cli_job : name => account.member }
  # The dlq-replay job's own grants (below), and its replayed and expired events (events.tf).
  dlq_replay_member = { for name, member in local.cli_job_members : name => member if name == "dlq-replay" }

  # A stalled delivery must not be settled while Pub/Sub may still redeliver it: the grace exceeds
  # the delivery subscription's longest retry backoff.
  delivery_max_backoff_seconds = tonumber(trimsuffix(
    try(local.subscriptions["delivery"].retry_policy.maximum_backoff, "600s"), "s"
  ))
}

resource "google_service_account" "cli_job" {
  for_each = local.cli_jobs

  project      = var.project_id
  account_id   = "mailpipe-${each.key}"
  display_name = "mailpipe ${each.key} (Cloud Run job)"
  description  = each.value.description

  depends_on = [google_project_service.enabled]
}

resource "google_cloud_run_v2_job" "cli_job" {
  for_each = local.cli_jobs

  project             = var.project_id
  name                = "mailpipe-${each.key}"
  location            = var.region
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    task_count = 1

    template {
      service_account = google_service_account.cli_job[each.key].email
      timeout         = "${each.value.timeout_seconds}s"
      max_retries     = each.value.max_retries

      containers {
        name = each.key
        # The publisher image carries the mailpipe CLI; the console script `mailpipe` is on its
        # PATH.
        image   = coalesce(each.value.image, var.publisher_image)
        command = ["mailpipe"]
        args    = each.value.args

        resources {
          limits = {
            cpu    = "1"
            memory = "512Mi"
          }
        }

        dynamic "env" {
          for_each = each.value.exports_telemetry ? local.publisher_env : merge(local.publisher_env, { MAILPIPE_TRACES = "none" })
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  lifecycle {
    precondition {
      condition     = each.key != "reconcile" || var.reconcile_grace_seconds > local.delivery_max_backoff_seconds
      error_message = "reconcile_grace_seconds must exceed the delivery subscription's maximum retry backoff (${local.delivery_max_backoff_seconds} s, topology.json), or reconcile could settle a mail whose redelivery is still on its way."
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.record_access,
  ]
}

# Record access for both jobs (the mailpipe database only), and Cloud Trace and Monitoring for the
# one that exports telemetry: the services' grants (iam.tf, local.record_users and
# local.runtime_members). The dlq-replay job's Pub/Sub grants follow.

# Pull the dead-lettered mails, ack the replayed and expired ones, extend and release the others:
# on the dead-letter subscription only.
resource "google_pubsub_subscription_iam_member" "dlq_replay_pulls_dead_letters" {
  for_each = local.dlq_replay_member

  project      = var.project_id
  subscription = google_pubsub_subscription.subscription["dead_letter"].name
  role         = "roles/pubsub.subscriber"
  member       = each.value
}

# Republish a due mail to the mail topic, and to nothing else (its events: events.tf).
resource "google_pubsub_topic_iam_member" "dlq_replay_publishes_mail" {
  for_each = local.dlq_replay_member

  project = var.project_id
  topic   = google_pubsub_topic.topic["mail"].name
  role    = "roles/pubsub.publisher"
  member  = each.value
}

# Addresses these resources had when reconcile.tf and deliver_by.tf each declared their own job.
moved {
  from = google_service_account.reconcile[0]
  to   = google_service_account.cli_job["reconcile"]
}
moved {
  from = google_service_account.dlq_replay[0]
  to   = google_service_account.cli_job["dlq-replay"]
}
moved {
  from = google_cloud_run_v2_job.reconcile[0]
  to   = google_cloud_run_v2_job.cli_job["reconcile"]
}
moved {
  from = google_cloud_run_v2_job.dlq_replay[0]
  to   = google_cloud_run_v2_job.cli_job["dlq-replay"]
}
