# Alert policies. Each one's documentation says what it means and what to do first.

locals {
  delivery_subscription_filter = "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${local.delivery_subscription_name}\""

  # The subscriptions where dead letters wait for an operator, one alert each: the mails' and, with
  # webhooks, the delivery events' (events.tf) that no endpoint took.
  dead_letter_alerts = merge({
    mails = {
      subscription = local.dead_letter_subscription_name
      display_name = "mailpipe: mails in the dead-letter subscription"
      runbook      = <<-EOT
        At least one mail exhausted its delivery attempts and was dead-lettered to
        `${local.dead_letter_topic_name}`. Inspect with `mailpipe dlq list`, fix the cause, then
        `mailpipe dlq replay`.
      EOT
    }
    }, local.event_webhooks_enabled ? {
    event_webhooks = {
      subscription = google_pubsub_subscription.event_webhook_dead_letter[0].name
      display_name = "mailpipe: delivery events no webhook endpoint took"
      runbook      = <<-EOT
        A webhook's endpoint failed an event's every delivery attempt; the event waits on
        `${google_pubsub_subscription.event_webhook_dead_letter[0].name}` for 7 days, then is gone.
        `gcloud pubsub subscriptions pull` it (CloudPubSubDeadLetterSourceSubscription names the
        webhook), fix the endpoint, and hand the events over (docs/events.md).
      EOT
    }
  } : {})

  # The monitored-resource types the OpenTelemetry exporter writes mailpipe's metrics against
  # (opentelemetry-resourcedetector-gcp, get_monitored_resource): generic_task when the resource
  # names an instance (a Cloud Run service whose instance the detector read from the metadata
  # server), and its fallback generic_node otherwise (detection failed or timed out, or a process
  # that is not a Cloud Run service). A PromQL query over a metric written against more than one
  # type must name the type in the monitored_resource label
  # (cloud.google.com/monitoring/promql/promql-mapping), so every query reads each type by name and
  # adds them up; a process writes under one type, so nothing is counted twice.
  metric_resource_types = ["generic_task", "generic_node"]

  # OpenTelemetry counters exported by the Cloud Monitoring exporter become metric types
  # workload.googleapis.com/mailpipe.mails.<outcome>; in PromQL the first "/" maps to ":" and every
  # other "." or "/" to "_" (cloud.google.com/monitoring/promql/promql-mapping).
  outcome_rate = {
    for outcome in ["delivered", "deferred", "bounced"] :
    outcome => "(${join(" + ", [
      for type in local.metric_resource_types :
      "(sum(rate(workload_googleapis_com:mailpipe_mails_${outcome}{monitored_resource=\"${type}\"}[10m])) or vector(0))"
    ])})"
  }

  # Every policy: an incident whose condition has had no data this long closes by itself instead of
  # staying open for the default 7 days.
  alert_auto_close = "${var.alert_auto_close_seconds}s"
}

resource "google_monitoring_alert_policy" "delivery_lag" {
  project               = var.project_id
  display_name          = "mailpipe: mails waiting too long for delivery"
  combiner              = "OR"
  notification_channels = var.notification_channels
  user_labels           = local.labels
  # Mail is late for everyone behind the oldest one: someone must look now.
  severity = "ERROR"

  alert_strategy {
    auto_close = local.alert_auto_close
  }

  conditions {
    display_name = "oldest unacked message on ${local.delivery_subscription_name} older than ${var.oldest_unacked_age_threshold_seconds}s"

    condition_threshold {
      filter          = "metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\" AND ${local.delivery_subscription_filter}"
      comparison      = "COMPARISON_GT"
      threshold_value = var.oldest_unacked_age_threshold_seconds
      duration        = "60s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      The oldest mail on `${local.delivery_subscription_name}` has waited more than
      ${var.oldest_unacked_age_threshold_seconds} s. Either the relay keeps deferring (check the
      error-ratio alert and `mailpipe.outcome` on `mail deliver` spans in Cloud Trace), or the
      subscriber is failing or scaled to its maximum (Cloud Run metrics of `${local.subscriber_service_name}`).
    EOT
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "dead_letters" {
  for_each = local.dead_letter_alerts

  project               = var.project_id
  display_name          = each.value.display_name
  combiner              = "OR"
  notification_channels = var.notification_channels
  user_labels           = local.labels
  # Mails or events that will not arrive without an operator.
  severity = "ERROR"

  alert_strategy {
    auto_close = local.alert_auto_close
  }

  conditions {
    display_name = "undelivered messages on the dead-letter subscription > 0"

    condition_threshold {
      filter          = "metric.type = \"pubsub.googleapis.com/subscription/num_undelivered_messages\" AND resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${each.value.subscription}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = each.value.runbook
  }

  depends_on = [google_project_service.enabled]
}

# Its address when it watched the mails' dead letters only.
moved {
  from = google_monitoring_alert_policy.dead_letters
  to   = google_monitoring_alert_policy.dead_letters["mails"]
}

resource "google_monitoring_alert_policy" "delivery_error_ratio" {
  project               = var.project_id
  display_name          = "mailpipe: high delivery error ratio"
  combiner              = "OR"
  notification_channels = var.notification_channels
  user_labels           = local.labels
  # Deferred mails are retried by Pub/Sub; bounces are final but per recipient. Worth a look,
  # rarely an emergency by itself (the lag and dead-letter alerts say when it becomes one).
  severity = "WARNING"

  alert_strategy {
    auto_close = local.alert_auto_close
  }

  conditions {
    display_name = "(deferred + bounced) / all outcomes > ${var.delivery_error_ratio_threshold} over 10 min"

    condition_prometheus_query_language {
      # No traffic gives 0/0 = NaN, which never fires.
      query               = "(${local.outcome_rate.deferred} + ${local.outcome_rate.bounced}) / (${local.outcome_rate.delivered} + ${local.outcome_rate.deferred} + ${local.outcome_rate.bounced}) > ${var.delivery_error_ratio_threshold}"
      duration            = "300s"
      evaluation_interval = "60s"
      # The metrics only exist once the subscriber has delivered something; without this the policy
      # cannot be created on a fresh project.
      disable_metric_validation = true
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      More than ${var.delivery_error_ratio_threshold * 100}% of delivery attempts in the last 10 minutes were
      deferred (4xx, timeouts, connection errors) or bounced (5xx). Filter `mail deliver` spans by
      `mailpipe.outcome` and `smtp.reply.code` in Cloud Trace to see what the relay answers.
    EOT
  }

  depends_on = [google_project_service.enabled]
}
