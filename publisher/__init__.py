"""The publisher service: accepts mail requests over HTTP and publishes them to Pub/Sub."""
