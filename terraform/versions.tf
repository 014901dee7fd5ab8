# Provider range: bounded above so a future major (9.x) with breaking renames cannot slip in
# unreviewed; 7.x and 8.x both have every resource and argument used here (checked offline against
# the 8.7.0 schema with shared/tools/tf-schema-check).
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 7.0, < 9.0"
    }
  }
}
