# Docker repository for the publisher, subscriber and canary images (docs/deploy.md pushes to it).

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Images hold no secrets or user data; Google-managed encryption at rest is sufficient here. Add kms_key_name where an organisation policy requires CMEK.
  project       = var.project_id
  location      = var.region
  repository_id = var.artifact_registry_repository_id
  format        = "DOCKER"
  description   = "mailpipe container images (publisher, subscriber)"
  labels        = local.labels

  docker_config {
    # A tag, once pushed, always means the same image: a re-push cannot silently change what a
    # Cloud Run revision runs.
    immutable_tags = true
  }

  # Keep storage bounded: drop untagged images after 30 days, but always keep the 10 newest versions.
  cleanup_policies {
    id     = "delete-old-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "2592000s"
    }
  }

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }

  depends_on = [google_project_service.enabled]
}
