# The Pub/Sub topology, read from THE one declaration, mailpipe/topology.json, which the emulator
# (mailpipe.topology / emulator.apply_topology) reads too. There is no second list here: topics and
# subscriptions are created with for_each over these maps, keyed by the declaration's keys.
#
# This file holds only locals (no resources, no variables) so the test suite can evaluate it with a
# bare `terraform console` (no providers needed) and compare it with mailpipe.topology.load_topology().
# The defaults below mirror parse_topology() in mailpipe/topology.py.
locals {
  topology = jsondecode(file("${path.module}/../mailpipe/topology.json"))

  topics = {
    for key, topic in local.topology.topics : key => {
      name                       = topic.name
      message_retention_duration = try(topic.message_retention_duration, null)
    }
  }

  subscriptions = {
    for key, sub in local.topology.subscriptions : key => {
      name                       = sub.name
      topic                      = sub.topic # a key of local.topics
      delivery                   = try(sub.delivery, "pull")
      push_path                  = try(sub.push_path, "/")
      ack_deadline_seconds       = try(sub.ack_deadline_seconds, 10)
      message_retention_duration = try(sub.message_retention_duration, null)
      retry_policy               = try(sub.retry_policy, null)
      dead_letter                = try(sub.dead_letter, null) # {topic = a key of local.topics, max_delivery_attempts}
    }
  }

  push_subscriptions        = { for key, sub in local.subscriptions : key => sub if sub.delivery == "push" }
  pull_subscriptions        = { for key, sub in local.subscriptions : key => sub if sub.delivery == "pull" }
  dead_letter_subscriptions = { for key, sub in local.subscriptions : key => sub if sub.dead_letter != null }

  # The names the services are configured with (the same roles mailpipe.topology.Topology names).
  mail_topic_name               = local.topics["mail"].name
  dead_letter_topic_name        = local.topics["dead_letter"].name
  delivery_subscription_name    = local.subscriptions["delivery"].name
  dead_letter_subscription_name = local.subscriptions["dead_letter"].name
}
