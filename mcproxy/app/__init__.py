"""The application: service, tap, workers, supervisor. Nothing imports it."""
