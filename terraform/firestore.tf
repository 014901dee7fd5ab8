# The delivery record (MAILPIPE_RECORD=firestore://DATABASE): a Firestore database in native mode,
# TTL policies so old records expire, and the index the status queries need.

resource "google_firestore_database" "record" {
  project     = var.project_id
  name        = var.firestore_database
  location_id = local.firestore_loc
  type        = "FIRESTORE_NATIVE"

  # Claims and idempotency reservations run in transactions; pessimistic locking (the default for
  # native mode) serialises competing claims instead of failing them.
  concurrency_mode = "PESSIMISTIC"

  # Recover from a bad deploy that corrupts records (7 days of point-in-time reads).
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"

  delete_protection_state = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy         = var.deletion_protection ? "ABANDON" : "DELETE"

  depends_on = [google_project_service.enabled]
}

# Firestore deletes a mail's record, and its idempotency key, some time after `expire_at`
# (accepted_at + the record's ttl_days, written by mailpipe/record/firestore.py); a suppression
# list entry some time after its own `expires_at` (set by PUT /v1/suppressions/{address}; entries
# without one are kept; mailpipe ignores an expired entry from that moment on, the deletion,
# typically within 24 h, only frees the storage). Keyed by collection: collection => TTL field.
resource "google_firestore_field" "record_ttl" {
  for_each = {
    (local.record_collection)             = local.record_ttl_field
    (local.record_idempotency_collection) = local.record_ttl_field
    (local.suppressions_collection)       = local.suppressions_ttl_field
  }

  project    = var.project_id
  database   = google_firestore_database.record.name
  collection = each.key
  field      = each.value

  ttl_config {}

  # A TTL field is written once and never queried: exempt it from single-field indexing
  # (recommended for TTL fields; avoids index hot-spots on monotonically increasing timestamps).
  index_config {}
}

# GET /v1/suppressions?reason= and ?domain= (equality, order by created_at, then __name__); with
# both filters Firestore merges the two indexes.
resource "google_firestore_index" "suppressions_by_filter" {
  for_each = toset(["reason", "domain"])

  project    = var.project_id
  database   = google_firestore_database.record.name
  collection = local.suppressions_collection

  fields {
    field_path = each.value
    order      = "ASCENDING"
  }

  fields {
    field_path = "created_at"
    order      = "ASCENDING"
  }

  fields {
    field_path = "__name__"
    order      = "ASCENDING"
  }
}

# FirestoreRecord.list (filter on status, order by accepted_at) and oldest_undelivered (status IN
# [...], order by accepted_at) need this composite index in production; the emulator needs none.
resource "google_firestore_index" "record_status_accepted_at" {
  project    = var.project_id
  database   = google_firestore_database.record.name
  collection = local.record_collection

  fields {
    field_path = "status"
    order      = "ASCENDING"
  }

  fields {
    field_path = "accepted_at"
    order      = "ASCENDING"
  }

  # The queries' tie-breaker (order_by("__name__")); listed so the API's implicit field causes no diff.
  fields {
    field_path = "__name__"
    order      = "ASCENDING"
  }
}
