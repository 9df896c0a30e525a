"""AMD's public SEV-SNP certificates, the built-in trust of :class:`keysteward.attest.snp.SnpTrust`.

``ark-milan.pem`` is AMD's root (ARK) for Milan and ``ask-milan.pem`` the signing key (ASK) it certifies,
as AMD publishes them (KDS ``/vcek/v1/Milan/cert_chain``). They are public certificates, not secrets; they
are package data so that verification never fetches anything from the network.
"""
