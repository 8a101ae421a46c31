"""What every service shares: settings from the environment, JSON logging, the error
hierarchy and its HTTP mapping, the service-app factory, the internal HTTP client and
database helpers. Nothing domain-specific lives here."""
