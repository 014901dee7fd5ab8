# The APIs mailpipe uses. disable_on_destroy = false: `terraform destroy` must not switch off APIs
# that other workloads in the same project may rely on.
locals {
  services = toset(concat([
    "artifactregistry.googleapis.com", # container images
    "cloudtrace.googleapis.com",       # spans from both services
    "firestore.googleapis.com",        # the delivery record
    "iam.googleapis.com",              # service accounts
    "logging.googleapis.com",          # Cloud Run request and application logs
    "monitoring.googleapis.com",       # OpenTelemetry metrics and alert policies
    "pubsub.googleapis.com",           # the mail topic, dead-letter topic and subscriptions
    "run.googleapis.com",              # the services, the worker pool and the jobs
    "secretmanager.googleapis.com",    # the SMTP password
    ], length(local.cli_jobs) > 0 || local.canary_enabled ? [
    "cloudscheduler.googleapis.com", # starts the reconcile, dlq-replay and canary jobs
  ] : []))
}

resource "google_project_service" "enabled" {
  for_each = local.services

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}
