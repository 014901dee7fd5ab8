# The reconcile job (`mailpipe reconcile --fix`): a Cloud Run job that Cloud Scheduler starts every
# 10 minutes by default (var.reconcile; the job's shape: scheduled_jobs.tf). It finds delivery
# records stuck mid-way, an idempotency reservation still `accepting` past its expiry (the
# publisher died between reserving the key and publishing) or a mail still `sending` past its lease
# plus a grace period (the subscriber died mid-delivery), and settles them, so a client's retry is
# not refused forever and `mailpipe status` tells the truth. It talks to Firestore only: no
# Pub/Sub, no publisher, no network egress setting.

locals {
  reconcile_enabled = var.reconcile.enabled
  reconcile_job     = "mailpipe-reconcile"

  # The job reads the publisher's configuration (ops/cli/reconcile.py: the record, the
  # reservation expiry, the grace), so it gets the publisher's environment: both always agree on
  # what "stuck" means. It exports no traces or metrics, so it needs no Trace or Monitoring role;
  # its JSON lines go to Cloud Logging from stdout.
  reconcile_env = merge(local.publisher_env, { MAILPIPE_TRACES = "none" })

  # A stalled delivery must not be settled while Pub/Sub may still redeliver it: the grace exceeds
  # the delivery subscription's longest retry backoff.
  delivery_max_backoff_seconds = tonumber(trimsuffix(
    try(local.subscriptions["delivery"].retry_policy.maximum_backoff, "600s"), "s"
  ))

  reconcile_scheduled_job = {
    reconcile = {
      enabled             = local.reconcile_enabled
      account_description = "Runs `mailpipe reconcile --fix`: reads and repairs stuck records in the delivery record."
      args                = ["reconcile", "--fix"]
      image               = coalesce(var.reconcile.image, var.publisher_image)
      env                 = local.reconcile_env
      schedule            = var.reconcile.schedule
      timeout_seconds     = var.reconcile.timeout_seconds
      holds               = var.reconcile_grace_seconds > local.delivery_max_backoff_seconds
      problem             = "reconcile_grace_seconds must exceed the delivery subscription's maximum retry backoff (${local.delivery_max_backoff_seconds} s, topology.json), or reconcile could settle a mail whose redelivery is still on its way."
    }
  }
}

# Read the records and rewrite the stuck ones (in transactions, like the services), in the mailpipe
# database only: the same condition as the services' grant (iam.tf). roles/datastore.user is the
# smallest predefined role with entity read/write.
resource "google_project_iam_member" "reconcile_record_access" {
  count = local.reconcile_enabled ? 1 : 0

  project = var.project_id
  role    = "roles/datastore.user"
  member  = google_service_account.job["reconcile"].member

  condition {
    title       = "mailpipe-record-only"
    description = "Only the mailpipe Firestore database."
    expression  = "resource.name == \"${local.firestore_database_name}\""
  }
}

# The job's resources before they shared one shape (scheduled_jobs.tf): the same objects, renamed.
moved {
  from = google_service_account.reconcile[0]
  to   = google_service_account.job["reconcile"]
}

moved {
  from = google_service_account.reconcile_scheduler[0]
  to   = google_service_account.job_scheduler["reconcile"]
}

moved {
  from = google_cloud_run_v2_job_iam_member.scheduler_runs_reconcile[0]
  to   = google_cloud_run_v2_job_iam_member.scheduler_runs_job["reconcile"]
}

moved {
  from = google_cloud_run_v2_job.reconcile[0]
  to   = google_cloud_run_v2_job.scheduled["reconcile"]
}

moved {
  from = google_cloud_scheduler_job.reconcile[0]
  to   = google_cloud_scheduler_job.scheduled["reconcile"]
}
