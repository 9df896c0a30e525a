"""The NBD proxy: serves decrypted volumes to clients so the volume key never enters the guest."""
