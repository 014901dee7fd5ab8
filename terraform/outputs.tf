# Outputs. None of them is a secret: the SMTP password appears only as a Secret Manager reference.

output "publisher_url" {
  description = "HTTPS URL of the publisher (POST /v1/messages). Callers need roles/run.invoker (publisher_invokers) and an identity token."
  value       = google_cloud_run_v2_service.publisher.uri
}

output "subscriber_url" {
  description = "URL of the subscriber (internal ingress: reachable by Pub/Sub push, not from the internet); null in pull mode (a worker pool has no URL)."
  value       = local.push_mode ? google_cloud_run_v2_service.subscriber[0].uri : null
}

output "subscriber_worker_pool" {
  description = "Name of the subscriber's Cloud Run worker pool in pull mode (gcloud run worker-pools describe NAME --region REGION), null in push mode."
  value       = local.pull_mode ? google_cloud_run_v2_worker_pool.subscriber[0].name : null
}

output "push_endpoint" {
  description = "Endpoint Pub/Sub pushes mails to: the subscriber URL plus push_path from mailpipe/topology.json; null in pull mode."
  value       = local.push_mode ? google_pubsub_subscription.subscription["delivery"].push_config[0].push_endpoint : null
}

output "push_audience" {
  description = "Audience of the push OIDC token (MAILPIPE_PUSH_AUDIENCE)."
  value       = local.push_audience
}

output "publisher_env" {
  description = "Environment of the publisher service, ready to export (e.g. to run `mailpipe status` against this deployment)."
  value       = local.publisher_env
}

output "subscriber_env" {
  description = "Environment of the subscriber service, without the secret-backed variables (see subscriber_secret_env)."
  value       = local.subscriber_env
}

output "subscriber_secret_env" {
  description = "Secret-backed variables of the subscriber: name => Secret Manager secret and version (references only, never values)."
  value = {
    for name, ref in local.subscriber_secret_env :
    name => "projects/${var.project_id}/secrets/${ref.secret}/versions/${ref.version}"
  }
}

output "topics" {
  description = "Pub/Sub topics by topology key (mail, dead_letter): full resource IDs."
  value       = { for key, topic in google_pubsub_topic.topic : key => topic.id }
}

output "subscriptions" {
  description = "Pub/Sub subscriptions by topology key (delivery, dead_letter): full resource IDs."
  value       = { for key, sub in google_pubsub_subscription.subscription : key => sub.id }
}

output "service_accounts" {
  description = "Emails of the service accounts: publisher, subscriber, push_invoker (MAILPIPE_PUSH_SERVICE_ACCOUNT; null in pull mode), and each CLI job's: reconcile, dlq-replay (null when disabled)."
  value = {
    publisher    = google_service_account.publisher.email
    subscriber   = google_service_account.subscriber.email
    push_invoker = local.push_mode ? google_service_account.push_invoker[0].email : null
    reconcile    = try(google_service_account.cli_job["reconcile"].email, null)
    dlq-replay   = try(google_service_account.cli_job["dlq-replay"].email, null)
  }
}

output "artifact_registry_repository" {
  description = "Docker repository prefix to tag and push images to: REGION-docker.pkg.dev/PROJECT/REPOSITORY."
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "firestore_database" {
  description = "The delivery record's Firestore database (MAILPIPE_RECORD = firestore://NAME)."
  value       = google_firestore_database.record.name
}

output "alert_policies" {
  description = "Alert policy IDs: delivery_lag, dead_letters, delivery_error_ratio, event_webhook_dead_letters (null without event_webhooks)."
  value = {
    delivery_lag               = google_monitoring_alert_policy.delivery_lag.id
    dead_letters               = google_monitoring_alert_policy.dead_letters["mails"].id
    delivery_error_ratio       = google_monitoring_alert_policy.delivery_error_ratio.id
    event_webhook_dead_letters = try(google_monitoring_alert_policy.dead_letters["event_webhooks"].id, null)
  }
}

output "reconcile_job" {
  description = "Name of the reconcile job (run it now: gcloud run jobs execute NAME --region REGION), or null when disabled."
  value       = try(google_cloud_run_v2_job.cli_job["reconcile"].name, null)
}

output "canary_job" {
  description = "Name of the canary's Cloud Run job (run it now: gcloud run jobs execute NAME --region REGION), or null without a canary."
  value       = local.canary_enabled ? google_cloud_run_v2_job.canary[0].name : null
}

output "canary_env" {
  description = "Environment of the canary job, without the secret-backed variables (see canary_secret_env); export it to run `mailpipe canary` against this deployment from your machine."
  value       = local.canary_env
}

output "canary_secret_env" {
  description = "Secret-backed variables of the canary job: name => Secret Manager secret and version (references only, never values)."
  value = {
    for name, ref in local.canary_secret_env :
    name => "projects/${var.project_id}/secrets/${ref.secret}/versions/${ref.version}"
  }
}
