"""The WireGuard protocol (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s), sans-I/O: bytes and the time
go in, bytes come out, and no module here opens a socket, starts a thread or reads a clock. One
module per concern, modelled on wireguard-go's device/ and boringtun's noise/: keys (the base64
key codec and key files), noise (the handshake messages and their state, TAI64N, the KDFs),
keypair (a transport session: seal and open with the counter nonce and padding), cookie (mac1,
mac2 and cookie replies) and replay (the anti-replay window)."""
