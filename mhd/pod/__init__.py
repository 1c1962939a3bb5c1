"""Files that run on the pod (trainer, launcher, dead-man timer); shipped as package data."""
