"""Evidence packages: a camera's time range as a third party can verify it without any token.

A package (``docs/evidence.md``) is a set of named files: the segment records and the signed
manifests exactly as the Archiver archived and sent them, the Archiver's certificate, the
minute keys of exactly the package's segments, the decrypted video, an index
(``EVIDENCE.json``) and ``SHA256SUMS``. ``build.build_package`` makes one from what a viewer's
verified stream gave it; ``verify.verify_package`` checks everything it can from the files
alone (signatures, chain, digests, key commitments, decryption, the video) and says why not.
The file names, labels and EvidenceError both use are in ``layout``.

Optionally the minute keys are sealed to a recipient certificate (``keys.sealed``): then the
package reveals no key to whoever else holds it, and only the recipient's token opens them.

Pure: bytes in, bytes out. No I/O (the client reads and writes the zip), no ``pkcs11``.
Verification failures here are *not* opaque (unlike a viewer's IntegrityError): the verifier
is offline, owns the package, and needs the reason for its report.
"""
