# The two Cloud Run services. Neither is public: no allUsers / allAuthenticatedUsers binding exists
# anywhere in this module (tests/unit/test_terraform.py checks it), and IAM invoker checks stay on.

resource "google_cloud_run_v2_service" "publisher" {
  project             = var.project_id
  name                = local.publisher_service_name
  location            = var.region
  description         = "mailpipe publisher: POST /v1/messages -> Pub/Sub"
  deletion_protection = var.deletion_protection
  labels              = local.labels

  # Authenticated only: with INGRESS_TRAFFIC_ALL every request still needs an identity token of a
  # member of publisher_invokers (run.invoker below). Choose INTERNAL_ONLY for VPC-only clients.
  ingress              = var.publisher_ingress
  invoker_iam_disabled = false

  template {
    service_account                  = google_service_account.publisher.email
    max_instance_request_concurrency = var.publisher_scaling.concurrency
    timeout                          = "${var.publisher_scaling.timeout}s"

    scaling {
      min_instance_count = var.publisher_scaling.min_instances
      max_instance_count = var.publisher_scaling.max_instances
    }

    containers {
      name  = "publisher"
      image = var.publisher_image

      ports {
        container_port = 8080
      }

      # GET /healthz answers without touching Pub/Sub, Firestore or the relay: "the process serves".
      startup_probe {
        period_seconds    = 2
        failure_threshold = 30
        http_get {
          path = "/healthz"
        }
      }

      liveness_probe {
        period_seconds    = 30
        failure_threshold = 3
        http_get {
          path = "/healthz"
        }
      }

      resources {
        limits = {
          cpu    = var.publisher_scaling.cpu
          memory = var.publisher_scaling.memory
        }
        # Instance-based billing (CPU always allocated): spans and metrics are exported in the
        # background between requests, in batches, so Cloud Trace write calls do not grow with the
        # request rate (docs/deploy.md, "CPU and telemetry"). Set explicitly: with a resources
        # block, leaving cpu_idle unset does not mean request-based billing.
        cpu_idle          = false
        startup_cpu_boost = true
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

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.runtime_record_access,
    google_pubsub_topic_iam_member.publisher_publishes_mail,
  ]
}

resource "google_cloud_run_v2_service" "subscriber" {
  project             = var.project_id
  name                = local.subscriber_service_name
  location            = var.region
  description         = "mailpipe subscriber: Pub/Sub push -> SMTP"
  deletion_protection = var.deletion_protection
  labels              = local.labels

  # INTERNAL_ONLY works with Pub/Sub push: Cloud Run counts requests from Pub/Sub in the same project
  # (or VPC Service Controls perimeter) as internal traffic (cloud.google.com/run/docs/securing/ingress,
  # "Internal" setting). Condition: the push endpoint is the default run.app URL, which it is here.
  # Nothing on the internet can reach the service at all; IAM (run.invoker for the push invoker only)
  # and the OIDC audience are checked on top.
  ingress              = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  invoker_iam_disabled = false

  # Pub/Sub's OIDC token carries this audience rather than the service URL (which is not known
  # before the service exists and would make the subscriber's own env depend on it).
  custom_audiences = [local.push_audience]

  template {
    service_account = google_service_account.subscriber.email
    # One push request = one mail = one SMTP transaction; concurrency near the SMTP pool size keeps
    # requests from queueing for a connection while their ack deadline runs.
    max_instance_request_concurrency = var.subscriber_scaling.concurrency
    # <= the push subscription's ack deadline (precondition below).
    timeout = "${local.subscriber_timeout_seconds}s"

    scaling {
      min_instance_count = var.subscriber_scaling.min_instances
      max_instance_count = var.subscriber_scaling.max_instances
    }

    containers {
      name  = "subscriber"
      image = var.subscriber_image

      ports {
        container_port = 8080
      }

      # GET /healthz answers without touching Pub/Sub, Firestore or the relay: "the process serves".
      startup_probe {
        period_seconds    = 2
        failure_threshold = 30
        http_get {
          path = "/healthz"
        }
      }

      liveness_probe {
        period_seconds    = 30
        failure_threshold = 3
        http_get {
          path = "/healthz"
        }
      }

      resources {
        limits = {
          cpu    = var.subscriber_scaling.cpu
          memory = var.subscriber_scaling.memory
        }
        # Instance-based billing (CPU always allocated), as for the publisher: batched span export
        # and the 60 s metric export need CPU between pushes (docs/deploy.md, "CPU and telemetry").
        cpu_idle          = false
        startup_cpu_boost = true
      }

      # Cloud Run IAM verifies the push token and strips its signature before the container sees
      # it: the subscriber checks the claims (subscriber/auth.py).
      env {
        name  = "MAILPIPE_PUSH_AUTH"
        value = "cloud-run"
      }

      dynamic "env" {
        for_each = local.subscriber_env
        content {
          name  = env.key
          value = env.value
        }
      }

      # The SMTP password as a Secret Manager reference, never a plain value.
      dynamic "env" {
        for_each = local.subscriber_secret_env
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

  lifecycle {
    precondition {
      condition     = local.subscriber_timeout_seconds <= local.min_push_ack_deadline
      error_message = "The subscriber's request timeout must not exceed the push subscription's ack deadline (topology.json), or Pub/Sub re-pushes mails that are still being delivered."
    }
    precondition {
      condition     = var.smtp_timeout_seconds < local.subscriber_timeout_seconds
      error_message = "smtp_timeout_seconds must be below the subscriber's request timeout, so a stalled relay ends in a deferral (nack) rather than a killed request."
    }
    precondition {
      condition     = (var.smtp_username == null) == (var.smtp_password_secret_id == null)
      error_message = "Set smtp_username and smtp_password_secret_id together (or neither)."
    }
    precondition {
      condition     = !(local.smtp_auth && var.smtp_tls == "none")
      error_message = "SMTP AUTH over smtp_tls = \"none\" would send the password in clear; use starttls or implicit."
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.runtime_record_access,
    # Cloud Run resolves the secret at deploy time with the service's own identity.
    google_secret_manager_secret_iam_member.subscriber_reads_smtp_password,
  ]
}

# --- Who may call the services ------------------------------------------------------------------

# Only the push invoker account may call the subscriber.
resource "google_cloud_run_v2_service_iam_member" "push_invoker_calls_subscriber" {
  project  = var.project_id
  location = google_cloud_run_v2_service.subscriber.location
  name     = google_cloud_run_v2_service.subscriber.name
  role     = "roles/run.invoker"
  member   = google_service_account.push_invoker.member
}

# Named callers of the publisher (public access is refused by the variable's validation).
resource "google_cloud_run_v2_service_iam_member" "publisher_invokers" {
  for_each = toset(var.publisher_invokers)

  project  = var.project_id
  location = google_cloud_run_v2_service.publisher.location
  name     = google_cloud_run_v2_service.publisher.name
  role     = "roles/run.invoker"
  member   = each.value
}
