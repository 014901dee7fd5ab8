# Topics and subscriptions, one resource per entry of mailpipe/topology.json (see topology.tf).

resource "google_pubsub_topic" "topic" {
  #checkov:skip=CKV_GCP_83:Messages are encrypted at rest with Google-managed keys; CMEK is an organisation policy choice (add kms_key_name plus the Pub/Sub agent's encrypter grant where required).
  for_each = local.topics

  project                    = var.project_id
  name                       = each.value.name
  message_retention_duration = each.value.message_retention_duration
  labels                     = local.labels

  depends_on = [google_project_service.enabled]
}

resource "google_pubsub_subscription" "subscription" {
  for_each = local.subscriptions

  project                    = var.project_id
  name                       = each.value.name
  topic                      = google_pubsub_topic.topic[each.value.topic].id
  ack_deadline_seconds       = each.value.ack_deadline_seconds
  message_retention_duration = each.value.message_retention_duration
  labels                     = local.labels

  # Never expire: an idle mail pipeline (a quiet weekend) must not lose its subscription.
  expiration_policy {
    ttl = ""
  }

  # Exponential backoff between redeliveries of a deferred (nacked) mail.
  dynamic "retry_policy" {
    for_each = each.value.retry_policy == null ? [] : [each.value.retry_policy]
    content {
      minimum_backoff = retry_policy.value.minimum_backoff
      maximum_backoff = retry_policy.value.maximum_backoff
    }
  }

  # After max_delivery_attempts deferrals the mail moves to the dead-letter topic. The Pub/Sub service
  # agent needs publisher on that topic and subscriber on this subscription (see below).
  dynamic "dead_letter_policy" {
    for_each = each.value.dead_letter == null ? [] : [each.value.dead_letter]
    content {
      dead_letter_topic     = google_pubsub_topic.topic[dead_letter_policy.value.topic].id
      max_delivery_attempts = coalesce(var.max_delivery_attempts, dead_letter_policy.value.max_delivery_attempts)
    }
  }

  # Push to the subscriber's Cloud Run URL with a Google-signed OIDC token minted for the dedicated
  # invoker service account. Cloud Run checks the token (run.invoker + custom audience) before the
  # request reaches the container, and the subscriber checks audience and email again.
  # In pull mode no subscription has a push config: the worker pool pulls them.
  dynamic "push_config" {
    for_each = each.value.delivery == "push" && local.push_mode ? [each.value] : []
    content {
      push_endpoint = "${google_cloud_run_v2_service.subscriber[0].uri}${push_config.value.push_path}"

      oidc_token {
        service_account_email = google_service_account.push_invoker[0].email
        audience              = local.push_audience
      }
    }
  }

  lifecycle {
    precondition {
      condition     = each.value.dead_letter == null || try(coalesce(var.max_delivery_attempts, each.value.dead_letter.max_delivery_attempts) >= 5 && coalesce(var.max_delivery_attempts, each.value.dead_letter.max_delivery_attempts) <= 100, false)
      error_message = "max_delivery_attempts (topology.json or the variable) must be 5..100."
    }
  }

  depends_on = [
    # The agent must be able to mint the invoker's token before the first push.
    google_service_account_iam_member.pubsub_agent_mints_invoker_tokens,
    # ...and the invoker must be allowed to call the subscriber, or the first pushes get 403.
    google_cloud_run_v2_service_iam_member.push_invoker_calls_subscriber,
  ]
}

# --- The Pub/Sub service agent ----------------------------------------------------------------------
# Google's identity that pushes (minting the invoker's OIDC tokens, iam.tf) and forwards messages to
# dead-letter topics. Asked of Service Usage rather than spelled out by hand: this creates the agent
# if the API was enabled so recently that it does not exist yet (a grant to a missing account
# fails), and the address is whatever Google says it is. google-beta only (versions.tf); destroying
# it only forgets it.
resource "google_project_service_identity" "pubsub" {
  provider = google-beta

  project = var.project_id
  service = "pubsub.googleapis.com"

  depends_on = [google_project_service.enabled]
}

# What it needs for dead-lettering. Documented requirement
# (cloud.google.com/pubsub/docs/handling-failures): without these grants messages are never
# forwarded and the subscription shows a dead-letter permission warning.

locals {
  # Every subscription with a dead-letter policy, keyed as its grant below: the declaration's by
  # their key, the integrators' webhooks (events.tf) as "webhook NAME".
  dead_letter_sources = merge(
    { for key, sub in local.dead_letter_subscriptions : key => google_pubsub_subscription.subscription[key].name },
    { for name, hook in var.event_webhooks : "webhook ${name}" => google_pubsub_subscription.event_webhook[name].name },
  )

  # The topics they forward to, keyed as their grant below: the declaration's by their key, and the
  # webhooks' own (events.tf). One grant per topic, however many subscriptions forward to it.
  dead_letter_topics = merge(
    { for key in distinct([for sub in values(local.dead_letter_subscriptions) : sub.dead_letter.topic]) : key => google_pubsub_topic.topic[key].name },
    local.event_webhooks_enabled ? { event_webhooks = google_pubsub_topic.event_webhook_dead_letter[0].name } : {},
  )
}

# Publish the failed message to the dead-letter topic.
resource "google_pubsub_topic_iam_member" "pubsub_agent_publishes_dead_letters" {
  for_each = local.dead_letter_topics

  project = var.project_id
  topic   = each.value
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_service_agent
}

# Acknowledge the forwarded message on the source subscription.
resource "google_pubsub_subscription_iam_member" "pubsub_agent_acks_dead_letters" {
  for_each = local.dead_letter_sources

  project      = var.project_id
  subscription = each.value
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}

# The publish grant was keyed by the subscription that forwards (the delivery subscription); it is
# keyed by its topic now, so several subscriptions forwarding to one topic share one grant.
moved {
  from = google_pubsub_topic_iam_member.pubsub_agent_publishes_dead_letters["delivery"]
  to   = google_pubsub_topic_iam_member.pubsub_agent_publishes_dead_letters["dead_letter"]
}

# --- Operators: `mailpipe dlq list` pulls the dead-letter subscription, `dlq replay` republishes ---
# ...and the webhook dead letters, which their alert's runbook has them pull (docs/events.md).
locals {
  operator_subscriptions = merge(
    { for key, _ in local.pull_subscriptions : key => google_pubsub_subscription.subscription[key].name },
    local.event_webhooks_enabled ? { event-webhooks-dead-letter = google_pubsub_subscription.event_webhook_dead_letter[0].name } : {},
  )
}

resource "google_pubsub_subscription_iam_member" "operators_pull" {
  for_each = { for pair in setproduct(keys(local.operator_subscriptions), var.operators) : "${pair[0]} ${pair[1]}" => { subscription = pair[0], member = pair[1] } }

  project      = var.project_id
  subscription = local.operator_subscriptions[each.value.subscription]
  role         = "roles/pubsub.subscriber"
  member       = each.value.member
}

# ...and `mailpipe dlq replay` republishes the mails it selects to the mail topic.
resource "google_pubsub_topic_iam_member" "operators_replay" {
  for_each = toset(var.operators)

  project = var.project_id
  topic   = google_pubsub_topic.topic["mail"].name
  role    = "roles/pubsub.publisher"
  member  = each.value
}
