"""``keysteward devcloud``: a local stand-in for a cloud provider, for the demo and the tests.

It plays what a cloud gives its instances: a provider signing key and certificate, instances made
by command, and a metadata service that hands each instance its signed identity (AWS-shaped PKCS#7
documents and GCP-shaped identity JWTs), bound to a nonce the instance chooses. Nothing here is a
security boundary: its signing key sits in a file next to its state.
"""
