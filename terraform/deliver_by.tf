# Retries beyond Pub/Sub's (docs/deliver-by.md): the dlq-replay job runs `mailpipe dlq replay --due`
# every var.dlq_replay.every_minutes minutes (its scheduler: schedules.tf). Each pass republishes
# the dead-lettered mails whose next attempt (the subscriber's retry schedule) has come, expires
# those past their deliver_by, and leaves the rest on the dead-letter subscription.

locals {
  dlq_replay_enabled = var.dlq_replay.enabled
  dlq_replay_member  = local.dlq_replay_enabled ? { dlq-replay = google_service_account.dlq_replay[0].member } : {}
}

resource "google_service_account" "dlq_replay" {
  count = local.dlq_replay_enabled ? 1 : 0

  project      = var.project_id
  account_id   = "mailpipe-dlq-replay"
  display_name = "mailpipe dlq-replay (Cloud Run job)"
  description  = "Runs `mailpipe dlq replay --due`: republishes due dead-lettered mails, expires those past deliver_by."

  depends_on = [google_project_service.enabled]
}

resource "google_cloud_run_v2_job" "dlq_replay" {
  count = local.dlq_replay_enabled ? 1 : 0

  project             = var.project_id
  name                = "mailpipe-dlq-replay"
  location            = var.region
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    task_count = 1

    template {
      service_account = google_service_account.dlq_replay[0].email
      timeout         = "${var.dlq_replay.timeout_seconds}s"
      # A pass acks only what it handled: a failed run may be retried once, the next comes anyway.
      max_retries = 1

      containers {
        name = "dlq-replay"
        # The publisher image carries the mailpipe CLI. It reads the publisher's configuration
        # (topics, dead-letter subscription, record) and exports its replay spans to Cloud Trace.
        image   = coalesce(var.dlq_replay.image, var.publisher_image)
        command = ["mailpipe"]
        args    = ["dlq", "replay", "--due", "--json"]

        resources {
          limits = {
            cpu    = "1"
            memory = "512Mi"
          }
        }

        dynamic "env" {
          for_each = local.publisher_env
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.runtime_record_access,
  ]
}

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

# Record access (to read next_attempt_at and deliver_by, mark mails replayed or expired), Cloud
# Trace and Cloud Monitoring: the services' grants (iam.tf, local.runtime_members).
