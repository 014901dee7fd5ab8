# Inputs. Topic and subscription names, ack deadlines, retry and dead-letter settings are NOT
# variables: they come from mailpipe/topology.json (see topology.tf), so the emulator and GCP agree.

# ---------------------------------------------------------------------------------------------
# Where
# ---------------------------------------------------------------------------------------------
variable "project_id" {
  type        = string
  description = "ID of the Google Cloud project to deploy into (must already exist, with billing)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID (6-30 chars: lowercase letters, digits, hyphens), not a project number or name."
  }
}

variable "region" {
  type        = string
  description = "Region for Cloud Run, Artifact Registry and (by default) Firestore, e.g. \"europe-west1\"."

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a Google Cloud region such as \"us-central1\" or \"europe-west1\" (not a zone)."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels added to every resource that takes labels."
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Images (built from publisher/Dockerfile, subscriber/Dockerfile and canary/Dockerfile, pushed to the repository this
# module creates: see the artifact_registry_repository output and docs/deploy.md)
# ---------------------------------------------------------------------------------------------
variable "publisher_image" {
  type        = string
  description = "Container image of the publisher, e.g. \"europe-west1-docker.pkg.dev/PROJECT/mailpipe/publisher:v1\" (a @sha256 digest is best)."

  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^ ]+(:[A-Za-z0-9_.-]+|@sha256:[a-f0-9]{64})$", var.publisher_image))
    error_message = "publisher_image must be a full image reference with a tag or @sha256 digest."
  }
}

variable "subscriber_image" {
  type        = string
  description = "Container image of the subscriber, e.g. \"europe-west1-docker.pkg.dev/PROJECT/mailpipe/subscriber:v1\" (a @sha256 digest is best)."

  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^ ]+(:[A-Za-z0-9_.-]+|@sha256:[a-f0-9]{64})$", var.subscriber_image))
    error_message = "subscriber_image must be a full image reference with a tag or @sha256 digest."
  }
}

variable "canary_image" {
  type        = string
  description = "Container image of the canary job (canary/Dockerfile), e.g. \"europe-west1-docker.pkg.dev/PROJECT/mailpipe/canary:v1\" (a @sha256 digest is best). Required when canary is set; unused otherwise."
  default     = null

  validation {
    condition     = var.canary_image == null || can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^ ]+(:[A-Za-z0-9_.-]+|@sha256:[a-f0-9]{64})$", coalesce(var.canary_image, "x")))
    error_message = "canary_image must be null or a full image reference with a tag or @sha256 digest."
  }
}

variable "artifact_registry_repository_id" {
  type        = string
  description = "ID of the Artifact Registry Docker repository created for the images."
  default     = "mailpipe"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", var.artifact_registry_repository_id))
    error_message = "artifact_registry_repository_id must be lowercase letters, digits and hyphens, starting with a letter."
  }
}

# ---------------------------------------------------------------------------------------------
# Delivery policy
# ---------------------------------------------------------------------------------------------
variable "max_delivery_attempts" {
  type        = number
  description = "Override of dead_letter.max_delivery_attempts from mailpipe/topology.json (null = use the declaration, which keeps GCP identical to the emulator). Pub/Sub accepts 5..100."
  default     = null

  validation {
    condition     = var.max_delivery_attempts == null || try(var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100 && floor(var.max_delivery_attempts) == var.max_delivery_attempts, false)
    error_message = "max_delivery_attempts must be a whole number from 5 to 100 (Pub/Sub's limits), or null."
  }
}

variable "subscriber_request_timeout_seconds" {
  type        = number
  description = "Cloud Run request timeout of the subscriber (null = the push subscription's ack deadline). Must not exceed the ack deadline, or Pub/Sub re-pushes a mail while its first delivery is still running."
  default     = null

  validation {
    condition     = var.subscriber_request_timeout_seconds == null || try(var.subscriber_request_timeout_seconds >= 10 && var.subscriber_request_timeout_seconds <= 600, false)
    error_message = "subscriber_request_timeout_seconds must be 10..600 (it is further capped by the ack deadline)."
  }
}

# The timeout budget of one delivery, from the outside in (preconditions in run.tf enforce it):
#   smtp_pool_wait_seconds < delivery_timeout_seconds < subscriber request timeout <= ack deadline
# and smtp_timeout_seconds (one SMTP step) < the request timeout. What is left between the delivery
# timeout and the request timeout is for the record writes and the span flush after the relay's
# answer, so that a slow relay ends in a recorded deferral (503, nack) and never in a request Cloud
# Run kills while the SMTP transaction goes on.
variable "delivery_timeout_seconds" {
  type        = number
  description = "Upper bound of one whole delivery, including the wait for a pooled SMTP connection and every SMTP step (MAILPIPE_DELIVERY_TIMEOUT). Must stay below the subscriber's request timeout (push; by default the smallest ack deadline of the push subscriptions, 60 s) and the delivery subscription's ack deadline (both modes); leave some seconds for the record writes and span flush after it."
  default     = 45

  validation {
    condition     = var.delivery_timeout_seconds >= 1 && var.delivery_timeout_seconds <= 600
    error_message = "delivery_timeout_seconds must be 1..600 (and below the subscriber's request timeout)."
  }
}

variable "smtp_pool_wait_seconds" {
  type        = number
  description = "How long a delivery waits for a free pooled SMTP connection before it is deferred (MAILPIPE_SMTP_POOL_WAIT). Part of delivery_timeout_seconds, so it must be shorter."
  default     = 10

  validation {
    condition     = var.smtp_pool_wait_seconds > 0 && var.smtp_pool_wait_seconds <= 600
    error_message = "smtp_pool_wait_seconds must be more than 0 and at most 600 (and below delivery_timeout_seconds)."
  }
}

variable "idempotency_reservation_seconds" {
  type        = number
  description = "How long an idempotency key is held while its publish is in progress (MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS); an older reservation was left by a crash and is freed by the key's next request or the reconcile job. Must be longer than publish_timeout_seconds."
  default     = 300

  validation {
    condition     = var.idempotency_reservation_seconds >= 1 && var.idempotency_reservation_seconds <= 86400
    error_message = "idempotency_reservation_seconds must be 1..86400 (and longer than publish_timeout_seconds)."
  }
}

variable "reconcile_grace_seconds" {
  type        = number
  description = "How long past its lease a delivery may stay `sending` before /v1/stats and the reconcile job call it stalled (MAILPIPE_RECONCILE_GRACE_SECONDS). Must exceed the delivery subscription's maximum retry backoff (topology.json), so a redelivery on its way claims the mail first."
  default     = 900

  validation {
    condition     = var.reconcile_grace_seconds >= 0 && var.reconcile_grace_seconds <= 604800
    error_message = "reconcile_grace_seconds must be 0..604800 (and above the delivery subscription's maximum retry backoff)."
  }
}

variable "publish_timeout_seconds" {
  type        = number
  description = "How long the publisher waits for Pub/Sub to confirm a publish before it answers 503 (MAILPIPE_PUBLISH_TIMEOUT). Must stay below publisher_scaling.timeout, or Cloud Run cuts the request while the publish may still succeed."
  default     = 30

  validation {
    condition     = var.publish_timeout_seconds >= 1 && var.publish_timeout_seconds <= 600
    error_message = "publish_timeout_seconds must be 1..600 (and below publisher_scaling.timeout)."
  }
}

# ---------------------------------------------------------------------------------------------
# Subscriber: push (Cloud Run service) or streaming pull (Cloud Run worker pool)
# ---------------------------------------------------------------------------------------------
variable "subscriber_mode" {
  type        = string
  description = "How the subscriber receives mail. \"push\" (default): Pub/Sub pushes each mail to the subscriber's Cloud Run service (billed per instance, cpu_idle = false, so spans and metrics leave between requests; scales to zero). \"pull\": a Cloud Run worker pool runs `python -m subscriber pull` (streaming pull, CPU always allocated, subscriber_pull_instances instances always running); the subscriptions declared push in topology.json are created as pull subscriptions and no push invoker exists."
  default     = "push"

  validation {
    condition     = contains(["push", "pull"], var.subscriber_mode)
    error_message = "subscriber_mode must be \"push\" or \"pull\"."
  }
}

variable "subscriber_pull_instances" {
  type        = number
  description = "Pull mode only: instances of the subscriber worker pool, always running (worker pools do not scale on their own). Each runs smtp_pool_size SMTP connections."
  default     = 1

  validation {
    condition     = var.subscriber_pull_instances >= 1 && var.subscriber_pull_instances <= 100 && floor(var.subscriber_pull_instances) == var.subscriber_pull_instances
    error_message = "subscriber_pull_instances must be a whole number from 1 to 100: a pull subscriber with no instance delivers nothing."
  }
}

# ---------------------------------------------------------------------------------------------
# SMTP relay (MAILPIPE_SMTP_*)
# ---------------------------------------------------------------------------------------------
variable "smtp_host" {
  type        = string
  description = "Host name of the SMTP relay the subscriber delivers to (MAILPIPE_SMTP_HOST)."

  validation {
    condition     = length(trimspace(var.smtp_host)) > 0
    error_message = "smtp_host must not be empty."
  }
}

variable "smtp_port" {
  type        = number
  description = "SMTP port (MAILPIPE_SMTP_PORT); null = the default for smtp_tls (587 starttls, 465 implicit, 25 none)."
  default     = null

  validation {
    condition     = var.smtp_port == null || try(var.smtp_port >= 1 && var.smtp_port <= 65535, false)
    error_message = "smtp_port must be 1..65535 or null."
  }
}

variable "smtp_tls" {
  type        = string
  description = "TLS mode towards the relay (MAILPIPE_SMTP_TLS): starttls, implicit or none."
  default     = "starttls"

  validation {
    condition     = contains(["starttls", "implicit", "none"], var.smtp_tls)
    error_message = "smtp_tls must be starttls, implicit or none."
  }
}

variable "smtp_username" {
  type        = string
  description = "SMTP AUTH user name (MAILPIPE_SMTP_USERNAME); null = no AUTH. Set together with smtp_password_secret_id."
  default     = null
}

variable "smtp_password_secret_id" {
  type        = string
  description = "ID of an existing Secret Manager secret in project_id holding the SMTP password (MAILPIPE_SMTP_PASSWORD). Create it yourself (docs/deploy.md) so the password never passes through Terraform variables or state; null = no AUTH."
  default     = null

  validation {
    condition     = var.smtp_password_secret_id == null || can(regex("^[A-Za-z0-9_-]{1,255}$", var.smtp_password_secret_id))
    error_message = "smtp_password_secret_id must be a secret ID (not a full resource name, not the password)."
  }
}

variable "smtp_password_secret_version" {
  type        = string
  description = "Version of the SMTP password secret to mount (\"latest\" or a number; pin a number for reproducible revisions)."
  default     = "latest"

  validation {
    condition     = can(regex("^(latest|[1-9][0-9]*)$", var.smtp_password_secret_version))
    error_message = "smtp_password_secret_version must be \"latest\" or a version number."
  }
}

variable "smtp_timeout_seconds" {
  type        = number
  description = "Timeout of each SMTP network operation (MAILPIPE_SMTP_TIMEOUT); must stay below the subscriber's request timeout."
  default     = 30

  validation {
    condition     = var.smtp_timeout_seconds >= 1 && var.smtp_timeout_seconds <= 600
    error_message = "smtp_timeout_seconds must be 1..600."
  }
}

variable "smtp_pool_size" {
  type        = number
  description = "SMTP connections kept open per subscriber instance (MAILPIPE_SMTP_POOL_SIZE)."
  default     = 4

  validation {
    condition     = var.smtp_pool_size >= 1 && var.smtp_pool_size <= 256
    error_message = "smtp_pool_size must be 1..256."
  }
}

variable "message_id_domain" {
  type        = string
  description = "Domain part of the Message-ID header of delivered mail (MAILPIPE_MESSAGE_ID_DOMAIN), usually your sending domain."

  validation {
    condition     = can(regex("^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$", var.message_id_domain))
    error_message = "message_id_domain must be a domain name such as \"mail.example.com\"."
  }
}

variable "allowed_sender_domains" {
  type        = list(string)
  description = "Domains the publisher accepts in a mail's From address (MAILPIPE_ALLOWED_SENDER_DOMAINS), e.g. [\"mail.example.com\"]: the domains your relay may send for (SPF/DKIM). Any other From is refused with 403 (sender_not_allowed, naming `from`), so a caller cannot make your relay send as someone else."

  validation {
    condition = length(var.allowed_sender_domains) > 0 && alltrue([
      for d in var.allowed_sender_domains :
      can(regex("^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$", d))
    ])
    error_message = "allowed_sender_domains must list at least one domain name such as \"mail.example.com\" (no address, no wildcard, no comma)."
  }
}

variable "sandbox_callers" {
  type        = list(string)
  description = "Callers whose every mail is sandboxed (MAILPIPE_SANDBOX_CALLERS): the whole pipeline runs, but the subscriber ends the SMTP transaction with RSET after RCPT TO, records the relay's replies and status `sandboxed`, and sends nothing. Each entry is a caller as the publisher identifies it from its Cloud Run-verified ID token: a service account or user email (\"ci@my-project.iam.gserviceaccount.com\"), \"sub:SUBJECT_ID\", or \"*\" for every caller (a staging deployment, like Postmark's sandbox servers). Such a caller's `\"sandbox\": false` is refused with 403 sandbox_required. Any caller may still ask for a sandbox mail with `\"sandbox\": true`."
  default     = []

  validation {
    condition = alltrue([
      for c in var.sandbox_callers :
      c == "*" || can(regex("^(sub:[!-~]{1,255}|[^@\\s,:]{1,64}@[^@\\s,]{1,253})$", c))
    ])
    error_message = "sandbox_callers entries must be caller emails (ci@PROJECT.iam.gserviceaccount.com), \"sub:SUBJECT_ID\" or \"*\" (no comma, no \"serviceAccount:\" prefix)."
  }
}

# ---------------------------------------------------------------------------------------------
# Cloud Run
# ---------------------------------------------------------------------------------------------
variable "publisher_ingress" {
  type        = string
  description = "Ingress of the publisher. INGRESS_TRAFFIC_ALL still requires IAM (run.invoker, granted only to publisher_invokers): reachable from your laptop with an identity token. INGRESS_TRAFFIC_INTERNAL_ONLY: only from VPCs of this project."
  default     = "INGRESS_TRAFFIC_ALL"

  validation {
    condition     = contains(["INGRESS_TRAFFIC_ALL", "INGRESS_TRAFFIC_INTERNAL_ONLY", "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"], var.publisher_ingress)
    error_message = "publisher_ingress must be INGRESS_TRAFFIC_ALL, INGRESS_TRAFFIC_INTERNAL_ONLY or INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER."
  }
}

variable "publisher_invokers" {
  type        = list(string)
  description = "IAM members allowed to call the publisher (roles/run.invoker), e.g. [\"user:you@example.com\", \"serviceAccount:app@P.iam.gserviceaccount.com\"]. Public access is not allowed."
  default     = []

  validation {
    condition     = alltrue([for m in var.publisher_invokers : can(regex("^(user|serviceAccount|group|domain|principal|principalSet):.+", m)) && !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "publisher_invokers must be IAM members such as user:x@example.com; allUsers and allAuthenticatedUsers are refused."
  }
}

variable "operators" {
  type        = list(string)
  description = "IAM members who run `mailpipe status` / `mailpipe dlq list|replay` against this deployment: read and write the delivery record, pull the dead-letter subscription (and the event webhooks' dead letters), republish to the mail topic."
  default     = []

  validation {
    condition     = alltrue([for m in var.operators : can(regex("^(user|serviceAccount|group|domain|principal|principalSet):.+", m)) && !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "operators must be IAM members such as user:x@example.com; allUsers and allAuthenticatedUsers are refused."
  }
}

variable "publisher_scaling" {
  type = object({
    min_instances = optional(number, 0)
    max_instances = optional(number, 10)
    concurrency   = optional(number, 16)
    cpu           = optional(string, "1")
    memory        = optional(string, "512Mi")
    timeout       = optional(number, 60)
  })
  description = "Publisher Cloud Run sizing: instances, requests per instance (at most the 16 gunicorn threads of mailpipe/serving.py, or requests queue inside the instance), CPU, memory, request timeout (seconds)."
  default     = {}

  validation {
    condition = (
      var.publisher_scaling.min_instances >= 0 &&
      var.publisher_scaling.max_instances >= max(1, var.publisher_scaling.min_instances) &&
      var.publisher_scaling.concurrency >= 1 && var.publisher_scaling.concurrency <= 1000 &&
      var.publisher_scaling.timeout >= 1 && var.publisher_scaling.timeout <= 3600
    )
    error_message = "publisher_scaling: need 0 <= min_instances <= max_instances (>= 1), concurrency 1..1000, timeout 1..3600."
  }
}

variable "subscriber_scaling" {
  type = object({
    min_instances = optional(number, 0)
    max_instances = optional(number, 10)
    concurrency   = optional(number, 8)
    cpu           = optional(string, "1")
    memory        = optional(string, "512Mi")
  })
  description = "Subscriber Cloud Run sizing. concurrency = push requests handled at once per instance; keep it near smtp_pool_size so requests do not queue for an SMTP connection. The request timeout comes from subscriber_request_timeout_seconds."
  default     = {}

  validation {
    condition = (
      var.subscriber_scaling.min_instances >= 0 &&
      var.subscriber_scaling.max_instances >= max(1, var.subscriber_scaling.min_instances) &&
      var.subscriber_scaling.concurrency >= 1 && var.subscriber_scaling.concurrency <= 1000
    )
    error_message = "subscriber_scaling: need 0 <= min_instances <= max_instances (>= 1) and concurrency 1..1000."
  }
}

variable "push_audience" {
  type        = string
  description = "Audience of the OIDC token Pub/Sub attaches to each push (MAILPIPE_PUSH_AUDIENCE). Registered as a Cloud Run custom audience of the subscriber. null = \"mailpipe-push:PROJECT:SUBSCRIPTION\"."
  default     = null
}

# ---------------------------------------------------------------------------------------------
# Delivery record (Firestore) and telemetry
# ---------------------------------------------------------------------------------------------
variable "firestore_database" {
  type        = string
  description = "Name of the Firestore (native mode) database created for the delivery record (MAILPIPE_RECORD=firestore://NAME)."
  default     = "mailpipe"

  validation {
    condition     = var.firestore_database == "(default)" || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database))
    error_message = "firestore_database must be 4-63 chars of lowercase letters, digits and hyphens (or \"(default)\")."
  }
}

variable "firestore_location" {
  type        = string
  description = "Firestore location (a region such as \"europe-west1\" or a multi-region such as \"nam5\"); null = region."
  default     = null
}

variable "trace_sample_ratio" {
  type        = number
  description = "Fraction of new traces sampled by the publisher (MAILPIPE_TRACE_SAMPLE_RATIO); the subscriber follows the publisher's decision. 1.0 shows every test mail in Cloud Trace; lower it for volume (Cloud Trace quota)."
  default     = 1.0

  validation {
    condition     = var.trace_sample_ratio >= 0 && var.trace_sample_ratio <= 1
    error_message = "trace_sample_ratio must be between 0 and 1."
  }
}

# ---------------------------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------------------------
variable "notification_channels" {
  type        = list(string)
  description = "Cloud Monitoring notification channel IDs (projects/P/notificationChannels/N) the alert policies notify."
  default     = []

  validation {
    condition     = alltrue([for c in var.notification_channels : can(regex("^projects/[^/]+/notificationChannels/[^/]+$", c))])
    error_message = "notification_channels must be full IDs: projects/PROJECT/notificationChannels/ID."
  }
}

variable "alert_auto_close_seconds" {
  type        = number
  description = "An open incident of any mailpipe alert policy closes by itself when its condition has had no data for this long (alert_strategy.auto_close). Cloud Monitoring accepts 1800 s (30 min) to 604800 s (7 days)."
  default     = 3600

  validation {
    condition     = var.alert_auto_close_seconds >= 1800 && var.alert_auto_close_seconds <= 604800
    error_message = "alert_auto_close_seconds must be 1800..604800 (Cloud Monitoring's limits)."
  }
}

variable "oldest_unacked_age_threshold_seconds" {
  type        = number
  description = "Alert when the oldest undelivered mail on the delivery subscription is older than this (seconds)."
  default     = 600

  validation {
    condition     = var.oldest_unacked_age_threshold_seconds >= 60
    error_message = "oldest_unacked_age_threshold_seconds must be at least 60."
  }
}

variable "delivery_error_ratio_threshold" {
  type        = number
  description = "Alert when (deferred + bounced) / all delivery outcomes over 10 minutes exceeds this fraction."
  default     = 0.1

  validation {
    condition     = var.delivery_error_ratio_threshold > 0 && var.delivery_error_ratio_threshold < 1
    error_message = "delivery_error_ratio_threshold must be between 0 and 1 (exclusive)."
  }
}

# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------
variable "deletion_protection" {
  type        = bool
  description = "Protect the Cloud Run services and the Firestore database from deletion. Set to false and apply before `terraform destroy`."
  default     = true
}

# ---------------------------------------------------------------------------------------------
# Canary (canary.tf, docs/canary.md): a probe mail through the whole pipeline to a real mailbox
# ---------------------------------------------------------------------------------------------
variable "canary" {
  type = object({
    imap_host                    = string
    imap_user                    = string
    imap_password_secret_id      = string
    imap_password_secret_version = optional(string, "latest")
    imap_port                    = optional(number)
    imap_tls                     = optional(string, "imaps")
    mailbox                      = optional(string, "INBOX")
    to                           = optional(string)
    schedule                     = optional(string, "*/5 * * * *")
    deadline_seconds             = optional(number, 600)
    poll_interval_seconds        = optional(number, 5)
  })
  description = "The canary job (null = no canary). imap_*: the mailbox it reads (MAILPIPE_CANARY_IMAP_*; port null = 993 for imaps, 143 for starttls); imap_password_secret_id: an existing Secret Manager secret in project_id holding the IMAP password (create it yourself, as for the SMTP password); to: the mailbox's address (null = imap_user); schedule: cron in UTC for Cloud Scheduler; deadline_seconds: how long a run waits for the probe. The job runs canary_image."
  default     = null

  validation {
    condition = var.canary == null || try(
      length(trimspace(var.canary.imap_host)) > 0 &&
      length(trimspace(var.canary.imap_user)) > 0 &&
      can(regex("^[A-Za-z0-9_-]{1,255}$", var.canary.imap_password_secret_id)) &&
      can(regex("^(latest|[1-9][0-9]*)$", var.canary.imap_password_secret_version)) &&
      contains(["imaps", "starttls"], var.canary.imap_tls) &&
      (var.canary.imap_port == null || try(var.canary.imap_port >= 1 && var.canary.imap_port <= 65535, false)) &&
      var.canary.deadline_seconds >= 30 && var.canary.deadline_seconds <= 3000 &&
      var.canary.poll_interval_seconds >= 1 && var.canary.poll_interval_seconds <= 60 &&
      length(split(" ", trimspace(var.canary.schedule))) == 5,
      false
    )
    error_message = "canary: imap_host and imap_user must be set; imap_password_secret_id must be a secret ID (not the password) and its version \"latest\" or a number; imap_tls must be imaps or starttls (never plain IMAP across a network); imap_port 1..65535 or null; deadline_seconds 30..3000 (the job's timeout is this plus 120 s); poll_interval_seconds 1..60; schedule a 5-field cron expression."
  }
}

variable "canary_time_to_inbox_threshold_seconds" {
  type        = number
  description = "Alert when the canary's mean time from the probe request to the probe visible in the mailbox, over 30 minutes, exceeds this (seconds). Keep it below canary.deadline_seconds: a probe slower than the deadline counts as a failed run instead."
  default     = 300

  validation {
    condition     = var.canary_time_to_inbox_threshold_seconds >= 10
    error_message = "canary_time_to_inbox_threshold_seconds must be at least 10."
  }
}

variable "canary_vpc_egress" {
  type = object({
    subnetwork   = string
    network      = optional(string)
    network_tags = optional(list(string), [])
  })
  description = "Direct VPC egress for the canary job: the subnetwork (a name in project_id and region, or projects/HOST/regions/REGION/subnetworks/NAME for a Shared VPC) it sends all its traffic through, with Private Google Access on. Required when publisher_ingress is not INGRESS_TRAFFIC_ALL: Cloud Run counts a request from another Cloud Run job as internal only when it leaves through a VPC. The canary's IMAP server must then be reachable from that VPC (Cloud NAT for a mailbox on the internet). null = no VPC egress."
  default     = null

  validation {
    condition = var.canary_vpc_egress == null || try(
      can(regex("^([a-z]([-a-z0-9]*[a-z0-9])?|projects/[^/]+/regions/[^/]+/subnetworks/[a-z]([-a-z0-9]*[a-z0-9])?)$", var.canary_vpc_egress.subnetwork)) &&
      (var.canary_vpc_egress.network == null || can(regex("^([a-z]([-a-z0-9]*[a-z0-9])?|projects/[^/]+/global/networks/[a-z]([-a-z0-9]*[a-z0-9])?)$", var.canary_vpc_egress.network))),
      false
    )
    error_message = "canary_vpc_egress.subnetwork must be a subnetwork name or projects/P/regions/R/subnetworks/NAME; network (optional, looked up from the subnetwork otherwise) a network name or projects/P/global/networks/NAME."
  }
}

# ---------------------------------------------------------------------------------------------
# Reconcile (cli_jobs.tf): `mailpipe reconcile --fix` on a schedule, for records stuck mid-way
# ---------------------------------------------------------------------------------------------
variable "reconcile" {
  type = object({
    enabled         = optional(bool, true)
    schedule        = optional(string, "*/10 * * * *")
    timeout_seconds = optional(number, 300)
    image           = optional(string)
  })
  description = "The reconcile job: a Cloud Run job that Cloud Scheduler starts on schedule (cron, UTC; default every 10 minutes) to run `mailpipe reconcile --fix`, which frees idempotency reservations stuck in `accepting` past their expiry and settles `sending` records past their lease. timeout_seconds: the job's limit per run. image: null = publisher_image (it carries the mailpipe CLI). enabled = false: no job."
  default     = {}

  validation {
    condition = (
      length(split(" ", trimspace(var.reconcile.schedule))) == 5 &&
      var.reconcile.timeout_seconds >= 60 && var.reconcile.timeout_seconds <= 3600 &&
      (var.reconcile.image == null || can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^ ]+(:[A-Za-z0-9_.-]+|@sha256:[a-f0-9]{64})$", coalesce(var.reconcile.image, "x"))))
    )
    error_message = "reconcile: schedule must be a 5-field cron expression, timeout_seconds 60..3600, image null or a full image reference with a tag or @sha256 digest."
  }
}

# Retries beyond Pub/Sub's (cli_jobs.tf): `mailpipe dlq replay --due` on a schedule
variable "dlq_replay" {
  type = object({
    enabled         = optional(bool, true)
    every_minutes   = optional(number, 5)
    timeout_seconds = optional(number, 240)
    image           = optional(string)
  })
  description = "The dlq-replay job: a Cloud Run job that Cloud Scheduler starts every `every_minutes` minutes (1..30; keep it under the retry schedule's shortest gap, 15 min by default) to run `mailpipe dlq replay --due`: dead-lettered mails whose next attempt has come are republished, those past their deliver_by expire (docs/deliver-by.md). timeout_seconds: the job's limit per run. image: null = publisher_image. enabled = false: no job (dead-lettered mails then wait for a manual replay, and expire only when one runs)."
  default     = {}

  validation {
    condition = (
      var.dlq_replay.every_minutes >= 1 && var.dlq_replay.every_minutes <= 30 &&
      floor(var.dlq_replay.every_minutes) == var.dlq_replay.every_minutes &&
      var.dlq_replay.timeout_seconds >= 60 && var.dlq_replay.timeout_seconds <= 3600 &&
      var.dlq_replay.timeout_seconds <= var.dlq_replay.every_minutes * 60 &&
      (var.dlq_replay.image == null || can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^ ]+(:[A-Za-z0-9_.-]+|@sha256:[a-f0-9]{64})$", coalesce(var.dlq_replay.image, "x"))))
    )
    error_message = "dlq_replay: every_minutes must be a whole number 1..30, timeout_seconds 60..3600 and at most every_minutes * 60 (Cloud Scheduler starts the next pass whether or not the last one ended), image null or a full image reference with a tag or @sha256 digest."
  }
}

variable "event_webhooks" {
  type = map(object({
    endpoint    = string
    audience    = optional(string)
    no_wrapper  = optional(bool, false)
    event_types = optional(list(string), [])
    # Delivery attempts before an event moves to the webhooks' dead-letter topic.
    max_delivery_attempts = optional(number, 100)
  }))
  description = "Integrators' HTTPS endpoints that receive the delivery events (docs/events.md) as Pub/Sub push requests, keyed by a name (the subscription is mailpipe-events-<name>). Each request carries a Google-signed OIDC token of the mailpipe-event-webhooks service account, for `audience` (default: the endpoint URL). no_wrapper = true sends the raw event JSON with the attributes (googclient_traceparent, event_type, mail_id) as HTTP headers instead of Pub/Sub's JSON envelope. event_types (default: all) keeps only those types, with a subscription filter. max_delivery_attempts (5..100, default 100: some 15 hours at the 600 s backoff) bounds the retries to an endpoint that keeps failing; the event then moves to the mailpipe-event-webhooks-dead-letter topic and subscription (7 days)."
  default     = {}

  validation {
    condition     = alltrue([for name in keys(var.event_webhooks) : can(regex("^[a-z][a-z0-9-]{0,39}$", name))])
    error_message = "event_webhooks keys must be 1-40 of a-z, 0-9 and '-', starting with a letter (they name the subscriptions)."
  }
  validation {
    condition     = alltrue([for hook in values(var.event_webhooks) : can(regex("^https://[^/?#@\\s]+(/[^\\s]*)?$", hook.endpoint))])
    error_message = "event_webhooks endpoints must be https:// URLs without credentials (Pub/Sub push sends the OIDC token in the clear over http)."
  }
  validation {
    condition     = alltrue([for hook in values(var.event_webhooks) : hook.audience == null || try(length(trimspace(hook.audience)) > 0, false)])
    error_message = "event_webhooks audience, when set, must not be empty (leave it out to use the endpoint URL)."
  }
  validation {
    condition     = alltrue(flatten([for hook in values(var.event_webhooks) : [for t in hook.event_types : contains(["accepted", "delivered", "deferred", "bounced", "suppressed", "dead_lettered", "expired", "replayed", "sandboxed"], t)]]))
    error_message = "event_webhooks event_types must be among accepted, delivered, deferred, bounced, suppressed, dead_lettered, expired, replayed, sandboxed (mailpipe.events.EventType)."
  }
  validation {
    condition     = alltrue([for hook in values(var.event_webhooks) : hook.max_delivery_attempts >= 5 && hook.max_delivery_attempts <= 100 && floor(hook.max_delivery_attempts) == hook.max_delivery_attempts])
    error_message = "event_webhooks max_delivery_attempts must be a whole number 5..100 (Pub/Sub's limits for a dead-letter policy)."
  }
}

# Addresses and the suppression list

variable "log_addresses" {
  type        = string
  description = "How recipient addresses may be kept in logs, spans, events and the suppression list (MAILPIPE_LOG_ADDRESSES): full, domain (@example.com) or hashed. Anything but full keys the suppression list by an HMAC under suppression_key_secret."
  default     = "domain"

  validation {
    condition     = contains(["full", "domain", "hashed"], var.log_addresses)
    error_message = "log_addresses must be full, domain or hashed."
  }
}

variable "suppression_key_secret" {
  type = object({
    id      = string
    version = optional(string, "latest")
  })
  description = "The suppression list's HMAC key (MAILPIPE_SUPPRESSION_KEY, at least 32 bytes: `openssl rand -base64 48`): id of an existing Secret Manager secret in project_id (create it yourself so the key never passes through Terraform variables or state) and its version (\"latest\" or a number; changing the key orphans every hashed entry: pin a number). Used where log_addresses is not full; null there = the suppression list is off (docs/suppressions.md)."
  default     = null

  validation {
    condition = var.suppression_key_secret == null || (
      can(regex("^[A-Za-z0-9_-]{1,255}$", var.suppression_key_secret.id)) &&
      can(regex("^(latest|[1-9][0-9]*)$", var.suppression_key_secret.version))
    )
    error_message = "suppression_key_secret: id must be a secret ID (not a full resource name, not the key), version \"latest\" or a number."
  }
}
