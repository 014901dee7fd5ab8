# Retries beyond Pub/Sub's (docs/deliver-by.md): the dlq-replay job runs `mailpipe dlq replay --due`
# every var.dlq_replay.every_minutes minutes (the job's shape: scheduled_jobs.tf). Each pass
# republishes the dead-lettered mails whose next attempt (the subscriber's retry schedule) has
# come, expires those past their deliver_by, and leaves the rest on the dead-letter subscription.

locals {
  dlq_replay_enabled = var.dlq_replay.enabled

  # It reads the publisher's configuration (the topics, the dead-letter subscription, the record)
  # and exports its replay spans, so each replay is a trace in Cloud Trace.
  dlq_replay_scheduled_job = {
    dlq-replay = {
      enabled             = local.dlq_replay_enabled
      account_description = "Runs `mailpipe dlq replay --due`: republishes due dead-lettered mails, expires those past deliver_by."
      args                = ["dlq", "replay", "--due", "--json"]
      image               = coalesce(var.dlq_replay.image, var.publisher_image)
      env                 = local.publisher_env
      schedule            = "*/${var.dlq_replay.every_minutes} * * * *"
      timeout_seconds     = var.dlq_replay.timeout_seconds
      holds               = true
      problem             = "unused: the dlq-replay job has no precondition"
    }
  }
  dlq_replay_member = local.dlq_replay_enabled ? { dlq-replay = google_service_account.job["dlq-replay"].member } : {}
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
