"""The coordinator: provisioning (pki), the federation (SuperLink, metrics exporter, the
site daemons this host runs) and the runs on it. Runs in short-lived `fedpacs federation|
run|provision` commands; imports fedpacs.common and fedpacs.server, never fedpacs.client."""
