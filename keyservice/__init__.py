"""Fusion stream encryption: wire format, crypto core, PKCS#11 token layer."""
