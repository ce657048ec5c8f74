"""The daemon: supervises detached containers and keeps their output."""
