# The smallest complete deployment: the root module with a project, a region, images and a relay.
# Copy terraform.tfvars.example to terraform.tfvars, fill it in, then see docs/deploy.md.

terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 7.0, < 9.0"
    }
    google-beta = {
      source  = "hashicorp/google-beta"
      version = ">= 7.0, < 9.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}

# The module reads the Pub/Sub service agent with google-beta's google_project_service_identity.
provider "google-beta" {
  project = var.project_id
  region  = var.region
}

variable "project_id" {
  type        = string
  description = "Google Cloud project ID to deploy into."
}

variable "region" {
  type        = string
  description = "Region for Cloud Run, Artifact Registry and Firestore."
  default     = "europe-west1"
}

variable "image_tag" {
  type        = string
  description = "Tag both images were pushed with (docs/deploy.md step 4)."
  default     = "v1"
}

variable "smtp_host" {
  type        = string
  description = "SMTP relay host name."
}

variable "smtp_username" {
  type        = string
  description = "SMTP AUTH user name (null = no AUTH)."
  default     = null
}

variable "smtp_password_secret_id" {
  type        = string
  description = "Secret Manager secret ID holding the SMTP password (null = no AUTH)."
  default     = null
}

variable "smtp_password_secret_version" {
  type        = string
  description = "Version of the SMTP password secret to use: a number after a rotation (docs/deploy.md step 2)."
  default     = "latest"
}

variable "suppression_key_secret_id" {
  type        = string
  description = "Secret Manager secret ID holding the suppression list's HMAC key (docs/deploy.md step 2; null = the list is off)."
  default     = null
}

variable "suppression_key_secret_version" {
  type        = string
  description = "Version of the suppression key secret: pin a number (a new key orphans every hashed entry; docs/suppressions.md)."
  default     = "1"
}

variable "message_id_domain" {
  type        = string
  description = "Domain of the Message-ID of delivered mail."
}

variable "allowed_sender_domains" {
  type        = list(string)
  description = "Domains the publisher accepts as the From of a mail, e.g. [\"mail.example.com\"]."
}

variable "subscriber_mode" {
  type        = string
  description = "\"push\" (Cloud Run service, the default) or \"pull\" (Cloud Run worker pool)."
  default     = "push"
}

variable "publisher_invokers" {
  type        = list(string)
  description = "Who may call the publisher, e.g. [\"user:you@example.com\"]."
  default     = []
}

variable "notification_channels" {
  type        = list(string)
  description = "Notification channel IDs for the alerts."
  default     = []
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the services and the Firestore database from deletion."
  default     = true
}

locals {
  repository = "${var.region}-docker.pkg.dev/${var.project_id}/mailpipe"
}

module "mailpipe" {
  source = "../.."

  project_id = var.project_id
  region     = var.region

  publisher_image  = "${local.repository}/publisher:${var.image_tag}"
  subscriber_image = "${local.repository}/subscriber:${var.image_tag}"

  smtp_host                    = var.smtp_host
  smtp_username                = var.smtp_username
  smtp_password_secret_id      = var.smtp_password_secret_id
  smtp_password_secret_version = var.smtp_password_secret_version
  suppression_key_secret       = var.suppression_key_secret_id == null ? null : { id = var.suppression_key_secret_id, version = var.suppression_key_secret_version }
  message_id_domain            = var.message_id_domain
  allowed_sender_domains       = var.allowed_sender_domains
  subscriber_mode              = var.subscriber_mode

  publisher_invokers    = var.publisher_invokers
  operators             = var.publisher_invokers
  notification_channels = var.notification_channels
  deletion_protection   = var.deletion_protection
}

output "publisher_url" {
  description = "URL of the publisher (POST /v1/messages with an identity token)."
  value       = module.mailpipe.publisher_url
}

output "publisher_env" {
  description = "Environment to run the mailpipe CLI against this deployment."
  value       = module.mailpipe.publisher_env
}

output "artifact_registry_repository" {
  description = "Where to push the images."
  value       = module.mailpipe.artifact_registry_repository
}
