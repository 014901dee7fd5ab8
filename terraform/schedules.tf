# Cloud Scheduler starts the Cloud Run jobs (the canary, reconcile, dlq-replay): for each job a
# scheduler job and a scheduler identity of its own, which may run that one job and nothing else.
# The jobs themselves, with their own identities, are in canary.tf and cli_jobs.tf.
#
# To schedule another job that runs the mailpipe CLI: add it to local.cli_jobs (cli_jobs.tf). Any
# other job: define it (with count) in its own file, add an entry here, and add its enabled flag to
# the cloudscheduler.googleapis.com condition in apis.tf.

locals {
  # name => the job to start. The name is the scheduler account's infix (mailpipe-NAME-scheduler,
  # 30 characters at most: lowercase letters, digits and hyphens, at most 11 of them).
  scheduled_jobs = merge({
    canary = {
      enabled     = local.canary_enabled
      job         = one(google_cloud_run_v2_job.canary[*].name)
      schedule    = try(local.canary.schedule, null)
      description = "Starts the mailpipe canary job."
    }
    }, {
    for name, job in local.cli_jobs : name => {
      enabled     = true
      job         = google_cloud_run_v2_job.cli_job[name].name
      schedule    = job.schedule
      description = "Starts the mailpipe ${name} job (mailpipe ${join(" ", job.args)})."
    }
  })

  schedules = { for name, job in local.scheduled_jobs : name => job if job.enabled }
}

resource "google_service_account" "scheduler" {
  for_each = local.schedules

  project      = var.project_id
  account_id   = "mailpipe-${each.key}-scheduler"
  display_name = "mailpipe ${each.key} scheduler"
  description  = "Identity of the Cloud Scheduler job that starts the ${each.key} job; may only run that job."

  depends_on = [google_project_service.enabled]
}

# The scheduler's identity may start its job and nothing else (run.jobs.run is in run.invoker).
resource "google_cloud_run_v2_job_iam_member" "scheduler_runs_job" {
  for_each = local.schedules

  project  = var.project_id
  location = var.region
  name     = each.value.job
  role     = "roles/run.invoker"
  member   = google_service_account.scheduler[each.key].member
}

resource "google_cloud_scheduler_job" "schedule" {
  for_each = local.schedules

  project          = var.project_id
  region           = var.region
  name             = each.value.job
  description      = each.value.description
  schedule         = each.value.schedule
  time_zone        = "Etc/UTC"
  attempt_deadline = "60s"

  # A missed start is made up by the next one (and a retried canary run would send a second probe).
  retry_config {
    retry_count = 0
  }

  # Cloud Run Admin API v2: jobs.run (cloud.google.com/run/docs/execute/jobs-on-schedule).
  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${each.value.job}:run"

    oauth_token {
      service_account_email = google_service_account.scheduler[each.key].email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_cloud_run_v2_job_iam_member.scheduler_runs_job,
  ]
}

# Addresses these resources had when canary.tf and reconcile.tf each declared their own.
moved {
  from = google_service_account.canary_scheduler[0]
  to   = google_service_account.scheduler["canary"]
}
moved {
  from = google_service_account.reconcile_scheduler[0]
  to   = google_service_account.scheduler["reconcile"]
}
moved {
  from = google_cloud_run_v2_job_iam_member.scheduler_runs_canary[0]
  to   = google_cloud_run_v2_job_iam_member.scheduler_runs_job["canary"]
}
moved {
  from = google_cloud_run_v2_job_iam_member.scheduler_runs_reconcile[0]
  to   = google_cloud_run_v2_job_iam_member.scheduler_runs_job["reconcile"]
}
moved {
  from = google_cloud_scheduler_job.canary[0]
  to   = google_cloud_scheduler_job.schedule["canary"]
}
moved {
  from = google_cloud_scheduler_job.reconcile[0]
  to   = google_cloud_scheduler_job.schedule["reconcile"]
}
