"""Where training runs: providers (who rents the machine) and sessions (how we talk to it)."""
