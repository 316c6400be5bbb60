"""Deployment: provisioning (CA, TLS, site keys), the local federation launcher, the CLI."""
