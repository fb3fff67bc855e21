"""The operator's viewer: a local web page served on 127.0.0.1 by ``fusion-client view``.

Keys are opened on the operator's token, every segment is verified and decrypted in this
process (client.player), and only verified plaintext, remuxed to fragmented MP4, reaches the
browser on the same machine. docs/viewer.md has the operator guide and the security reasoning.
"""

# No library surface: the page is fusion-client view's (backend, media and server are its parts).
__all__: list[str] = []
