# The operator jobs Cloud Scheduler starts: one shape, declared once. Each entry of
# local.scheduled_jobs (built from its own file: reconcile.tf, deliver_by.tf) gets a Cloud Run job
# running the `mailpipe` CLI from the publisher image, a service account for the job, a service
# account for its scheduler that may run only that job, and the Cloud Scheduler job. The roles a job
# needs for its work are granted beside its entry, on that job's account.

locals {
  scheduled_jobs = {
    for name, job in merge(local.reconcile_scheduled_job, local.dlq_replay_scheduled_job) :
    name => job if job.enabled
  }
}

# --- Identities ------------------------------------------------------------------------------------

resource "google_service_account" "job" {
  for_each = local.scheduled_jobs

  project      = var.project_id
  account_id   = "mailpipe-${each.key}"
  display_name = "mailpipe ${each.key} (Cloud Run job)"
  description  = each.value.account_description

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "job_scheduler" {
  for_each = local.scheduled_jobs

  project      = var.project_id
  account_id   = "mailpipe-${each.key}-scheduler"
  display_name = "mailpipe ${each.key} scheduler"
  description  = "Identity of the Cloud Scheduler job that starts the ${each.key} job; may only run that job."

  depends_on = [google_project_service.enabled]
}

# Each scheduler's identity may start its own job and nothing else (run.jobs.run is in run.invoker).
resource "google_cloud_run_v2_job_iam_member" "scheduler_runs_job" {
  for_each = local.scheduled_jobs

  project  = var.project_id
  location = google_cloud_run_v2_job.scheduled[each.key].location
  name     = google_cloud_run_v2_job.scheduled[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.job_scheduler[each.key].member
}

# --- The jobs and their schedules ------------------------------------------------------------------

resource "google_cloud_run_v2_job" "scheduled" {
  for_each = local.scheduled_jobs

  project             = var.project_id
  name                = "mailpipe-${each.key}"
  location            = var.region
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    task_count = 1

    template {
      service_account = google_service_account.job[each.key].email
      timeout         = "${each.value.timeout_seconds}s"
      # Each job's work is idempotent: a failed run may be retried once; the next schedule comes
      # anyway.
      max_retries = 1

      containers {
        name = each.key
        # The publisher image carries the mailpipe CLI; the console script `mailpipe` is on its
        # PATH.
        image   = each.value.image
        command = ["mailpipe"]
        args    = each.value.args

        resources {
          limits = {
            cpu    = "1"
            memory = "512Mi"
          }
        }

        dynamic "env" {
          for_each = each.value.env
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
      condition     = each.value.holds
      error_message = each.value.problem
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.reconcile_record_access,
    google_project_iam_member.runtime_record_access,
  ]
}

resource "google_cloud_scheduler_job" "scheduled" {
  for_each = local.scheduled_jobs

  project          = var.project_id
  region           = var.region
  name             = "mailpipe-${each.key}"
  description      = "Starts the mailpipe ${each.key} job (mailpipe ${join(" ", each.value.args)})."
  schedule         = each.value.schedule
  time_zone        = "Etc/UTC"
  attempt_deadline = "60s"

  # A missed start is made up by the next one.
  retry_config {
    retry_count = 0
  }

  # Cloud Run Admin API v2: jobs.run (cloud.google.com/run/docs/execute/jobs-on-schedule).
  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${google_cloud_run_v2_job.scheduled[each.key].name}:run"

    oauth_token {
      service_account_email = google_service_account.job_scheduler[each.key].email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_cloud_run_v2_job_iam_member.scheduler_runs_job,
  ]
}
