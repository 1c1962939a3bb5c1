"""The long-running service: assembly, watcher, triggers, control socket, client."""
