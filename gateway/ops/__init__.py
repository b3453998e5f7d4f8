"""What operators watch: metrics, readiness checks, logging set-up."""
