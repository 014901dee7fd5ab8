# The publisher and the subscriber: a Cloud Run service each, or in pull mode (subscriber_mode) the
# subscriber as a Cloud Run worker pool. Neither is public: no allUsers / allAuthenticatedUsers
# binding exists anywhere in this module (tests/unit/test_terraform.py checks it), and IAM invoker
# checks stay on.

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

      # The suppression list's HMAC key as a Secret Manager reference, never a plain value.
      dynamic "env" {
        for_each = local.publisher_secret_env
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
      condition     = var.publish_timeout_seconds < var.publisher_scaling.timeout
      error_message = "publish_timeout_seconds must be below publisher_scaling.timeout: a request Cloud Run cuts while the publish is still waiting can end in a published mail whose client saw an error (and sends it again)."
    }
    precondition {
      condition     = var.publish_timeout_seconds < var.idempotency_reservation_seconds
      error_message = "idempotency_reservation_seconds must be longer than publish_timeout_seconds, or a publish still in progress could lose its idempotency key (the publisher refuses to start otherwise)."
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.record_access,
    google_pubsub_topic_iam_member.publisher_publishes_mail,
    google_secret_manager_secret_iam_member.reads_suppression_key,
  ]
}

# Push mode. (Adding `count` moved the existing service to [0]; Terraform moves it by itself.)
resource "google_cloud_run_v2_service" "subscriber" {
  count = local.push_mode ? 1 : 0

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

      # MAILPIPE_PUSH_AUTH = "cloud-run" is in local.subscriber_env (main.tf), with the audience and
      # invoker the subscriber checks in the token Cloud Run stripped.
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

  # The timeout budget (variables.tf, above delivery_timeout_seconds):
  #   pool wait < whole delivery < request timeout <= ack deadline.
  lifecycle {
    precondition {
      condition     = local.subscriber_timeout_seconds <= local.min_push_ack_deadline
      error_message = "The subscriber's request timeout must not exceed the push subscription's ack deadline (topology.json), or Pub/Sub re-pushes mails that are still being delivered."
    }
    precondition {
      condition     = var.delivery_timeout_seconds < local.subscriber_timeout_seconds
      error_message = "delivery_timeout_seconds must be below the subscriber's request timeout (subscriber_request_timeout_seconds, default the ack deadline), so a slow delivery ends in a recorded deferral (503, nack) rather than a request Cloud Run kills while the SMTP transaction goes on."
    }
    precondition {
      condition     = var.smtp_pool_wait_seconds < var.delivery_timeout_seconds
      error_message = "smtp_pool_wait_seconds must be below delivery_timeout_seconds: waiting for a pooled connection is part of the delivery."
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
    google_project_iam_member.record_access,
    # Cloud Run resolves the secret at deploy time with the service's own identity.
    google_secret_manager_secret_iam_member.subscriber_reads_smtp_password,
    google_secret_manager_secret_iam_member.reads_suppression_key,
  ]
}

# Pull mode: a Cloud Run worker pool, the Cloud Run resource made for pull workloads. It has no URL
# and needs no listening port (the pull worker serves no HTTP; a Cloud Run service would fail its
# start-up probe), and its instances keep their CPU all the time (instance-based billing), which a
# streaming-pull client needs between messages to extend leases, flush spans and keep its streams
# open. It does not scale by itself: subscriber_pull_instances instances always run.
resource "google_cloud_run_v2_worker_pool" "subscriber" {
  count = local.pull_mode ? 1 : 0

  project             = var.project_id
  name                = local.subscriber_service_name
  location            = var.region
  description         = "mailpipe subscriber: Pub/Sub streaming pull -> SMTP"
  deletion_protection = var.deletion_protection
  labels              = local.labels

  # Manual scaling, the only kind the worker pool API has: exactly this many instances.
  scaling {
    manual_instance_count = var.subscriber_pull_instances
  }

  template {
    service_account = google_service_account.subscriber.email

    containers {
      name  = "subscriber"
      image = var.subscriber_image
      # The image's CMD runs the push endpoint; this runs the streaming-pull worker instead.
      command = ["python", "-m", "subscriber", "pull"]

      resources {
        limits = {
          cpu    = var.subscriber_scaling.cpu
          memory = var.subscriber_scaling.memory
        }
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

  # The timeout budget without a request: a delivery must end within its claim's lease (the
  # delivery subscription's ack deadline), or a redelivered copy may be sent while it still runs.
  lifecycle {
    precondition {
      condition     = var.delivery_timeout_seconds < local.delivery_lease_seconds
      error_message = "delivery_timeout_seconds must be below the delivery subscription's ack deadline (topology.json), which is how long a delivery's claim keeps a redelivered copy from being sent too."
    }
    precondition {
      condition     = var.smtp_pool_wait_seconds < var.delivery_timeout_seconds
      error_message = "smtp_pool_wait_seconds must be below delivery_timeout_seconds: waiting for a pooled connection is part of the delivery."
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
    google_project_iam_member.record_access,
    # The first pull must not be refused.
    google_pubsub_subscription_iam_member.subscriber_pulls,
    google_secret_manager_secret_iam_member.subscriber_reads_smtp_password,
    google_secret_manager_secret_iam_member.reads_suppression_key,
  ]
}

# --- Who may call the services ------------------------------------------------------------------

# Only the push invoker account may call the subscriber.
resource "google_cloud_run_v2_service_iam_member" "push_invoker_calls_subscriber" {
  count = local.push_mode ? 1 : 0

  project  = var.project_id
  location = google_cloud_run_v2_service.subscriber[0].location
  name     = google_cloud_run_v2_service.subscriber[0].name
  role     = "roles/run.invoker"
  member   = google_service_account.push_invoker[0].member
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
