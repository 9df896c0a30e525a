"""The AWS KMS external key store (XKS) proxy front-end: SigV4, the listener, the wire adapter."""
