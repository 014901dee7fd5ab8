"""Property-based and schema-driven fuzzing of the publisher API and the push endpoint."""
