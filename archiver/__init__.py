"""The Archiver: encrypts camera streams at ingest and serves per-viewer fusion streams."""
