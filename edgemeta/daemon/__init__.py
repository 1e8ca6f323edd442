"""The daemon: wiring, control loop, worker client, gate, triggers, metrics, systemd; no torch."""
