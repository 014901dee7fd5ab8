# The canary (`python -m canary`, the same as `mailpipe canary`; docs/canary.md): a Cloud Run job that Cloud Scheduler starts on a
# schedule. Each run sends a probe mail through the publisher to a real mailbox, reads it back over
# IMAP, deletes it and exports mailpipe.canary.* metrics (Cloud Monitoring) and spans (Cloud Trace,
# joined to the probe mail's own trace). An alert fires when a run fails, when the time to inbox
# passes a threshold, or when no run reported at all. Everything here exists only when var.canary
# is set.

locals {
  canary_enabled = var.canary != null
  canary         = local.canary_enabled ? var.canary : null
  canary_job     = "mailpipe-canary"

  canary_tls  = local.canary_enabled ? local.canary.imap_tls : "imaps"
  canary_port = local.canary_enabled ? coalesce(local.canary.imap_port, { imaps = 993, starttls = 143 }[local.canary_tls]) : 0

  # The job's environment (names: canary/probe.py CanaryConfig.from_env). The canary traces every
  # run (sample ratio 1): its read span joins the probe mail's trace, which the publisher samples
  # with its own ratio.
  canary_env = local.canary_enabled ? merge({
    GOOGLE_CLOUD_PROJECT           = var.project_id
    MAILPIPE_URL                   = google_cloud_run_v2_service.publisher.uri
    MAILPIPE_CANARY_PUBLISHER_AUTH = "google"
    MAILPIPE_CANARY_IMAP_HOST      = local.canary.imap_host
    MAILPIPE_CANARY_IMAP_PORT      = tostring(local.canary_port)
    MAILPIPE_CANARY_IMAP_TLS       = local.canary_tls
    MAILPIPE_CANARY_IMAP_USER      = local.canary.imap_user
    MAILPIPE_CANARY_MAILBOX        = local.canary.mailbox
    MAILPIPE_CANARY_DEADLINE       = tostring(local.canary.deadline_seconds)
    MAILPIPE_CANARY_POLL_INTERVAL  = tostring(local.canary.poll_interval_seconds)
    MAILPIPE_MESSAGE_ID_DOMAIN     = var.message_id_domain
    MAILPIPE_TRACES                = "gcp"
    MAILPIPE_TRACE_SAMPLE_RATIO    = "1"
    }, local.canary.to == null ? {} : {
    MAILPIPE_CANARY_TO = local.canary.to
  }) : {}

  # Secret-backed: name => Secret Manager reference (the value never passes through Terraform).
  canary_secret_env = local.canary_enabled ? {
    MAILPIPE_CANARY_IMAP_PASSWORD = {
      secret  = local.canary.imap_password_secret_id
      version = local.canary.imap_password_secret_version
    }
  } : {}

  canary_runs          = "workload_googleapis_com:mailpipe_canary_runs"
  canary_time_to_inbox = "workload_googleapis_com:mailpipe_canary_time_to_inbox"

  # The PromQL of the canary's alert, summed over every monitored-resource type the metrics may be
  # written against (monitoring.tf, local.metric_resource_types).
  canary_failed_runs = join(" + ", [
    for type in local.metric_resource_types :
    "(sum(increase(${local.canary_runs}{monitored_resource=\"${type}\",mailpipe_canary_outcome!=\"ok\"}[15m])) or vector(0))"
  ])
  canary_inbox_seconds = join(" + ", [
    for type in local.metric_resource_types :
    "(sum(increase(${local.canary_time_to_inbox}_sum{monitored_resource=\"${type}\"}[30m])) or vector(0))"
  ])
  canary_inbox_count = join(" + ", [
    for type in local.metric_resource_types :
    "(sum(increase(${local.canary_time_to_inbox}_count{monitored_resource=\"${type}\"}[30m])) or vector(0))"
  ])
  # absent_over_time gives one series per selector; `and on()` ignores their labels so the
  # condition holds only when the metric is absent under every type.
  canary_no_run = join(" and on() ", [
    for type in local.metric_resource_types :
    "absent_over_time(${local.canary_runs}{monitored_resource=\"${type}\"}[30m])"
  ])

  # Direct VPC egress (canary_vpc_egress): a subnetwork given by name lives in this project and
  # region; projects/HOST/regions/REGION/subnetworks/NAME names one of a Shared VPC host project.
  canary_vpc = local.canary_enabled && var.canary_vpc_egress != null
  canary_subnetwork = regex(
    "^(?:projects/([^/]+)/regions/([^/]+)/subnetworks/)?([^/]+)$",
    local.canary_vpc ? var.canary_vpc_egress.subnetwork : "none",
  )
  canary_subnetwork_project = coalesce(local.canary_subnetwork[0], var.project_id)
  canary_subnetwork_region  = coalesce(local.canary_subnetwork[1], var.region)
}

# The subnetwork the canary's traffic leaves through, read at plan time to check its Private Google
# Access before the job depends on it.
data "google_compute_subnetwork" "canary" {
  count = local.canary_vpc ? 1 : 0

  project = local.canary_subnetwork_project
  region  = local.canary_subnetwork_region
  name    = local.canary_subnetwork[2]
}

# --- Identities ------------------------------------------------------------------------------------

resource "google_service_account" "canary" {
  count = local.canary_enabled ? 1 : 0

  project      = var.project_id
  account_id   = "mailpipe-canary"
  display_name = "mailpipe canary (Cloud Run job)"
  description  = "Runs the canary: sends a probe through the publisher, reads the canary mailbox over IMAP."

  depends_on = [google_project_service.enabled]
}

# Send the probe (POST /v1/messages) and read its delivery record (GET /v1/messages/ID).
resource "google_cloud_run_v2_service_iam_member" "canary_calls_publisher" {
  count = local.canary_enabled ? 1 : 0

  project  = var.project_id
  location = google_cloud_run_v2_service.publisher.location
  name     = google_cloud_run_v2_service.publisher.name
  role     = "roles/run.invoker"
  member   = google_service_account.canary[0].member
}

# Read the IMAP password, and only that secret, when the job starts.
data "google_secret_manager_secret" "canary_imap_password" {
  count = local.canary_enabled ? 1 : 0

  project   = var.project_id
  secret_id = local.canary.imap_password_secret_id
}

# secretAccessor on that one secret only, for the canary's identity only.
resource "google_secret_manager_secret_iam_member" "canary_reads_imap_password" {
  count = local.canary_enabled ? 1 : 0

  project   = var.project_id
  secret_id = data.google_secret_manager_secret.canary_imap_password[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.canary[0].member
}

# Spans and metrics, as for the services: project-level roles with no narrower scope.
resource "google_project_iam_member" "canary_trace_writer" {
  count = local.canary_enabled ? 1 : 0

  project = var.project_id
  role    = "roles/cloudtrace.agent"
  member  = google_service_account.canary[0].member
}

# Its mailpipe.canary.* metrics drive the canary's alert.
resource "google_project_iam_member" "canary_metric_writer" {
  count = local.canary_enabled ? 1 : 0

  project = var.project_id
  role    = "roles/monitoring.metricWriter"
  member  = google_service_account.canary[0].member
}

# --- The job (its schedule: schedules.tf) ------------------------------------------------------------

resource "google_cloud_run_v2_job" "canary" {
  count = local.canary_enabled ? 1 : 0

  project             = var.project_id
  name                = local.canary_job
  location            = var.region
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    task_count = 1

    template {
      service_account = google_service_account.canary[0].email
      # The probe's deadline plus time for the IMAP sessions and the telemetry export.
      timeout = "${local.canary.deadline_seconds + 120}s"
      # No retry: a retried run would send a second probe and hide the failure the alert is for.
      max_retries = 0

      # Direct VPC egress, all traffic: with publisher_ingress internal, Cloud Run accepts a request
      # from a Cloud Run job only when it arrives through a VPC (cloud.google.com/run/docs/securing/
      # ingress). The publisher's run.app address is public, so PRIVATE_RANGES_ONLY would send it
      # around the VPC; ALL_TRAFFIC routes it through the subnetwork, whose Private Google Access
      # carries it (and the job's Cloud Trace/Monitoring calls) to Google. The IMAP server must be
      # reachable from the VPC too (Cloud NAT for one on the internet).
      dynamic "vpc_access" {
        for_each = local.canary_vpc ? [var.canary_vpc_egress] : []
        content {
          egress = "ALL_TRAFFIC"
          network_interfaces {
            network    = vpc_access.value.network
            subnetwork = vpc_access.value.subnetwork
            tags       = vpc_access.value.network_tags
          }
        }
      }

      containers {
        name = "canary"
        # The canary image (canary/Dockerfile): the shared core and the canary only.
        image   = var.canary_image
        command = ["python", "-m", "canary"]

        resources {
          limits = {
            cpu    = "1"
            memory = "512Mi"
          }
        }

        dynamic "env" {
          for_each = local.canary_env
          content {
            name  = env.key
            value = env.value
          }
        }

        # The IMAP password as a Secret Manager reference, never a plain value.
        dynamic "env" {
          for_each = local.canary_secret_env
          content {
            name = env.key
            value_source {
              secret_key_ref {
                secret  = env.value.secret
                version = env.value.version
              }
            }
          }
        }
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.canary_image != null
      error_message = "canary_image is required with canary: build canary/Dockerfile and push it beside the publisher and subscriber images (docs/deploy.md)."
    }
    precondition {
      condition     = local.canary.to != null || can(regex("@", local.canary.imap_user))
      error_message = "canary.to is required when canary.imap_user is not an e-mail address."
    }
    precondition {
      condition     = var.publisher_ingress == "INGRESS_TRAFFIC_ALL" || local.canary_vpc
      error_message = "The publisher's ingress is internal (publisher_ingress = ${var.publisher_ingress}): Cloud Run refuses the canary job's requests unless they leave through a VPC. Set canary_vpc_egress to a subnetwork with Private Google Access (docs/deploy.md, \"Canary behind internal ingress\")."
    }
    precondition {
      condition     = !local.canary_vpc || try(data.google_compute_subnetwork.canary[0].private_ip_google_access, false)
      error_message = "canary_vpc_egress.subnetwork must have Private Google Access on: the canary reaches the publisher's run.app address and Google's APIs through it."
    }
    precondition {
      condition     = local.canary_subnetwork_region == var.region
      error_message = "canary_vpc_egress.subnetwork must be in the job's region (${var.region}): Direct VPC egress uses a subnetwork of the job's own region."
    }
  }

  depends_on = [
    google_project_service.enabled,
    # Cloud Run resolves the secret at deploy time with the job's own identity.
    google_secret_manager_secret_iam_member.canary_reads_imap_password,
  ]
}

# --- Alert -------------------------------------------------------------------------------------------

resource "google_monitoring_alert_policy" "canary" {
  count = local.canary_enabled ? 1 : 0

  project               = var.project_id
  display_name          = "mailpipe: canary failing or mail slow to reach the inbox"
  combiner              = "OR"
  notification_channels = var.notification_channels
  user_labels           = local.labels
  # The one alert that watches a mail from the request to the mailbox: when it fires, users are
  # not getting mail.
  severity = "CRITICAL"

  alert_strategy {
    auto_close = local.alert_auto_close
  }

  conditions {
    display_name = "a canary run failed in the last 15 min"

    condition_prometheus_query_language {
      # OpenTelemetry attribute mailpipe.canary.outcome becomes the label mailpipe_canary_outcome.
      query               = "(${local.canary_failed_runs}) > 0"
      duration            = "0s"
      evaluation_interval = "60s"
      # The metric exists only after the first run; without this the policy cannot be created.
      disable_metric_validation = true
    }
  }

  conditions {
    display_name = "mean time to inbox over 30 min > ${var.canary_time_to_inbox_threshold_seconds}s"

    condition_prometheus_query_language {
      # No run in 30 min gives 0/0 = NaN, which never fires (the next condition covers it).
      query                     = "(${local.canary_inbox_seconds}) / (${local.canary_inbox_count}) > ${var.canary_time_to_inbox_threshold_seconds}"
      duration                  = "0s"
      evaluation_interval       = "60s"
      disable_metric_validation = true
    }
  }

  conditions {
    display_name = "no canary run reported for 30 min"

    condition_prometheus_query_language {
      query                     = local.canary_no_run
      duration                  = "0s"
      evaluation_interval       = "300s"
      disable_metric_validation = true
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      The canary sends a probe mail through the publisher to `${local.canary_enabled ? local.canary.imap_user : ""}`'s
      mailbox and reads it back over IMAP (job `${local.canary_job}`, docs/canary.md).
      - **run failed**: the label `mailpipe_canary_outcome` says how (publish_failed, imap_unavailable,
        tls_failed, login_refused, mailbox_missing, not_delivered, imap_error). The job's log has the
        run's message; for not_delivered it names the probe's delivery record status and SMTP reply.
      - **slow**: time to inbox above ${var.canary_time_to_inbox_threshold_seconds} s. Open the probe's
        trace (its `canary read` span sits under `mail deliver`) to see whether the time went to
        Pub/Sub retries, the relay, or the mailbox provider after the relay's 250.
      - **no run**: Cloud Scheduler job `${local.canary_job}` or the Cloud Run job is failing to start.
    EOT
  }

  depends_on = [google_project_service.enabled]
}
