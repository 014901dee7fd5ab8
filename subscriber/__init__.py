"""The subscriber service: receives mails from Pub/Sub (push or pull), delivers them over SMTP."""
