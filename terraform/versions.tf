# Provider range: bounded above so a future major (9.x) with breaking renames cannot slip in
# unreviewed; 7.x and 8.x both have every resource and argument used here (checked offline against
# the 8.7.0 schema with shared/tools/tf-schema-check).
#
# google-beta is needed for one resource only: google_project_service_identity (the Pub/Sub service
# agent, pubsub.tf), which the GA provider does not have. Configure it like google (same project and
# credentials; see examples/basic).
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
