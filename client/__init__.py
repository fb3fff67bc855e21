"""The viewer: logs in to an Archiver by proof of possession of its token, receives fusion
streams, opens epoch openers on the token, verifies and decrypts locally.

Depends on keyservice, never on archiver. The library parts (session, pinning, timespec,
player) do not print; ``client.cli`` is the thin command line.
"""
