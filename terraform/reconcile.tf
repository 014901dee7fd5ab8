# The reconcile job (`mailpipe reconcile --fix`): a Cloud Run job that Cloud Scheduler starts every
# 10 minutes by default (var.reconcile). It finds delivery records stuck mid-way, an idempotency
# reservation still `accepting` past its expiry (the publisher died between reserving the key and
# publishing) or a mail still `sending` past its lease plus a grace period (the subscriber died
# mid-delivery), and settles them, so a client's retry is not refused forever and `mailpipe status`
# tells the truth. It talks to Firestore only: no Pub/Sub, no publisher, no network egress setting.

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
}

# --- Identities ------------------------------------------------------------------------------------

resource "google_service_account" "reconcile" {
  count = local.reconcile_enabled ? 1 : 0

  project      = var.project_id
  account_id   = "mailpipe-reconcile"
  display_name = "mailpipe reconcile (Cloud Run job)"
  description  = "Runs `mailpipe reconcile --fix`: reads and repairs stuck records in the delivery record."

  depends_on = [google_project_service.enabled]
}

# Read the records and rewrite the stuck ones (in transactions, like the services), in the mailpipe
# database only: the same condition as the services' grant (iam.tf). roles/datastore.user is the
# smallest predefined role with entity read/write.
resource "google_project_iam_member" "reconcile_record_access" {
  count = local.reconcile_enabled ? 1 : 0

  project = var.project_id
  role    = "roles/datastore.user"
  member  = google_service_account.reconcile[0].member

  condition {
    title       = "mailpipe-record-only"
    description = "Only the mailpipe Firestore database."
    expression  = "resource.name == \"${local.firestore_database_name}\""
  }
}

# --- The job (its schedule: schedules.tf) ------------------------------------------------------------

resource "google_cloud_run_v2_job" "reconcile" {
  count = local.reconcile_enabled ? 1 : 0

  project             = var.project_id
  name                = local.reconcile_job
  location            = var.region
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    task_count = 1

    template {
      service_account = google_service_account.reconcile[0].email
      timeout         = "${var.reconcile.timeout_seconds}s"
      # A repair is idempotent: a failed run may be retried once; the next schedule comes anyway.
      max_retries = 1

      containers {
        name = "reconcile"
        # The publisher image carries the mailpipe CLI; the console script `mailpipe` is on its
        # PATH.
        image   = coalesce(var.reconcile.image, var.publisher_image)
        command = ["mailpipe"]
        args    = ["reconcile", "--fix"]

        resources {
          limits = {
            cpu    = "1"
            memory = "512Mi"
          }
        }

        dynamic "env" {
          for_each = local.reconcile_env
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
      condition     = var.reconcile_grace_seconds > local.delivery_max_backoff_seconds
      error_message = "reconcile_grace_seconds must exceed the delivery subscription's maximum retry backoff (${local.delivery_max_backoff_seconds} s, topology.json), or reconcile could settle a mail whose redelivery is still on its way."
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.reconcile_record_access,
  ]
}

