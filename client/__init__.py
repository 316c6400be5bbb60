"""The hospital side: site daemon (SuperNode + ClientApp), local trainer, PACS ingest."""
