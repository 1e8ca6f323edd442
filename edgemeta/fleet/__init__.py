"""Off the device: turning the episodes of a fleet into tasks to meta-train on."""
