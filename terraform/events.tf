# Delivery events (docs/events.md): the topic is topology.json's "events" (pubsub.tf creates it with
# the others); here are who may publish to it and the integrators' push subscriptions.

locals {
  events_topic_name = local.topics["events"].name

  # The identities that emit events: the publisher (accepted), the subscriber (delivered, deferred,
  # bounced, dead_lettered) and the operators who run `mailpipe dlq replay` (replayed).
  event_publishers = merge(
    { publisher = google_service_account.publisher.member, subscriber = google_service_account.subscriber.member },
    { for member in var.operators : "operator ${member}" => member },
    local.dlq_replay_member, # replayed, expired (cli_jobs.tf)
  )

  event_webhooks_enabled = length(var.event_webhooks) > 0

  # A subscription filter per webhook that asks for some types only (null: every event).
  event_webhook_filters = {
    for name, hook in var.event_webhooks : name => (
      length(hook.event_types) == 0 ? null : join(" OR ", [for t in hook.event_types : "attributes.event_type = \"${t}\""])
    )
  }
}

# Publish events to the events topic, and to no other topic: each emitter's own grant, on the
# topic only. Publishing is write-only; none of them may read events back.
resource "google_pubsub_topic_iam_member" "emitters_publish_events" {
  for_each = local.event_publishers

  project = var.project_id
  topic   = google_pubsub_topic.topic["events"].name
  role    = "roles/pubsub.publisher"
  member  = each.value
}

# --- Webhooks: push subscriptions to integrators' endpoints ----------------------------------------

# The identity in the webhooks' OIDC tokens, so a receiver can check who signed the request
# (docs/events.md). It holds no role at all: it only exists to be named in tokens.
resource "google_service_account" "event_webhooks" {
  count = local.event_webhooks_enabled ? 1 : 0

  project      = var.project_id
  account_id   = "mailpipe-event-webhooks"
  display_name = "mailpipe delivery-event webhooks"
  description  = "Identity in the OIDC token of the delivery-event push requests to integrators' endpoints."

  depends_on = [google_project_service.enabled]
}

# The Pub/Sub service agent mints the webhook tokens for that account (required for authenticated
# push, cloud.google.com/pubsub/docs/authenticate-push-subscriptions); granted on the account only.
resource "google_service_account_iam_member" "pubsub_agent_mints_event_webhook_tokens" {
  count = local.event_webhooks_enabled ? 1 : 0

  service_account_id = google_service_account.event_webhooks[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent
}

resource "google_pubsub_subscription" "event_webhook" {
  for_each = var.event_webhooks

  project = var.project_id
  name    = "mailpipe-events-${each.key}"
  topic   = google_pubsub_topic.topic["events"].id
  filter  = local.event_webhook_filters[each.key]
  labels  = local.labels

  # An endpoint that is down for a while gets the events it missed, for up to 7 days.
  ack_deadline_seconds       = 30
  message_retention_duration = "604800s"

  # Never expire: a webhook that is quiet for a month is still wanted.
  expiration_policy {
    ttl = ""
  }

  # Back off from an endpoint that fails, up to Pub/Sub's 600 s maximum...
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  # ...for max_delivery_attempts (default 100, some 15 hours of 600 s gaps), then forward the event
  # to the webhooks' dead-letter topic, where it waits 7 more days (below) instead of expiring
  # unseen with the retention. The Pub/Sub service agent's grants for it: pubsub.tf.
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.event_webhook_dead_letter[0].id
    max_delivery_attempts = each.value.max_delivery_attempts
  }

  push_config {
    push_endpoint = each.value.endpoint

    oidc_token {
      service_account_email = google_service_account.event_webhooks[0].email
      audience              = coalesce(each.value.audience, each.value.endpoint)
    }

    # Raw event JSON as the body; attributes (googclient_traceparent, event_type, mail_id) and
    # the message's metadata as headers (cloud.google.com/pubsub/docs/payload-unwrapping).
    dynamic "no_wrapper" {
      for_each = each.value.no_wrapper ? [true] : []
      content {
        write_metadata = true
      }
    }
  }

  # The agent must be able to mint the token before the first push.
  depends_on = [google_service_account_iam_member.pubsub_agent_mints_event_webhook_tokens]
}

# --- Webhooks' dead letters -------------------------------------------------------------------------

# The events a webhook's endpoint did not take within its delivery attempts, from every webhook
# (the attribute CloudPubSubDeadLetterSourceSubscription names the one it came from).
resource "google_pubsub_topic" "event_webhook_dead_letter" {
  #checkov:skip=CKV_GCP_83:Messages are encrypted at rest with Google-managed keys; CMEK is an organisation policy choice (add kms_key_name plus the Pub/Sub agent's encrypter grant where required).
  count = local.event_webhooks_enabled ? 1 : 0

  project                    = var.project_id
  name                       = "mailpipe-event-webhooks-dead-letter"
  message_retention_duration = "604800s"
  labels                     = local.labels

  depends_on = [google_project_service.enabled]
}

# Holds them for 7 days, for an operator to read (docs/events.md): a topic without a subscription
# would keep them only as retained topic messages that nobody sees.
resource "google_pubsub_subscription" "event_webhook_dead_letter" {
  count = local.event_webhooks_enabled ? 1 : 0

  project                    = var.project_id
  name                       = "mailpipe-event-webhooks-dead-letter"
  topic                      = google_pubsub_topic.event_webhook_dead_letter[0].id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  labels                     = local.labels

  # Never expire: dead letters are rare, and the subscription must be there when one comes.
  expiration_policy {
    ttl = ""
  }
}
