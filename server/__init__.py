"""The aggregation side: the Flower ServerApp, run directories, coordinator and registry."""
