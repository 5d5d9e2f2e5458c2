import Crypto
import CryptoExtras
import Foundation

/// The cryptographic steps of secure aggregation, all from swift-crypto: X25519 key agreement, HKDF-SHA256 key
/// derivation with a label per use, ChaCha20 keystreams expanding a 32-byte seed into a mask, and ChaCha20-Poly1305
/// envelopes for the shares.
public enum Primitives {
    /// HKDF-SHA256 (RFC 5869) of `secret` into `bytes` bytes.
    public static func hkdf(_ secret: [UInt8], salt: [UInt8], info: [UInt8], bytes: Int = 32) -> [UInt8] {
        let key = HKDF<SHA256>.deriveKey(inputKeyMaterial: SymmetricKey(data: secret), salt: salt, info: info, outputByteCount: bytes)
        return key.withUnsafeBytes { Array($0) }
    }

    /// The X25519 shared secret of a private and a public key, as bytes (RFC 7748).
    public static func agree(_ privateKey: Curve25519.KeyAgreement.PrivateKey, _ publicKey: [UInt8]) throws -> [UInt8] {
        let peer: Curve25519.KeyAgreement.PublicKey
        do { peer = try Curve25519.KeyAgreement.PublicKey(rawRepresentation: publicKey) } catch {
            throw PrivacyError(.malformed, "a public key is not 32 bytes of X25519")
        }
        let shared = try privateKey.sharedSecretFromKeyAgreement(with: peer)
        return shared.withUnsafeBytes { Array($0) }
    }

    /// A 32-byte key for one use (`label`) within a session, from an X25519 agreement: the two parties derive the
    /// same key, and keys of different labels or sessions are unrelated.
    public static func derive(_ privateKey: Curve25519.KeyAgreement.PrivateKey, _ publicKey: [UInt8], label: String,
                              session: [UInt8]) throws -> [UInt8] {
        hkdf(try agree(privateKey, publicKey), salt: session, info: Array("whittle secure aggregation \(label)".utf8))
    }

    /// Bytes of the ChaCha20 keystream (RFC 8439) under a 32-byte `key` and 12-byte `nonce`, from block `counter`.
    public static func keystream(key: [UInt8], nonce: [UInt8], counter: UInt32 = 0, bytes: Int) throws -> [UInt8] {
        guard key.count == 32, nonce.count == 12 else {
            throw PrivacyError(.invalidArgument, "a ChaCha20 keystream needs a 32-byte key and a 12-byte nonce")
        }
        guard bytes > 0 else { return [] }
        guard UInt64(counter) + UInt64((bytes + 63) / 64) <= UInt64(UInt32.max) + 1 else {
            throw PrivacyError(.invalidArgument, "a keystream of \(bytes) bytes from block \(counter) passes ChaCha20's 32-bit counter")
        }
        let out = try Insecure.ChaCha20CTR.encrypt([UInt8](repeating: 0, count: bytes), using: SymmetricKey(data: key),
                                                   counter: try Insecure.ChaCha20CTR.Counter(offset: counter),
                                                   nonce: try Insecure.ChaCha20CTR.Nonce(data: nonce))
        return Array(out)
    }

    /// Words of a mask in the ring of integers modulo 2⁶⁴: the keystream under `seed` for mask `stream` (a nonce of
    /// the stream number, so one seed masks several vectors without reusing a keystream), 8 bytes per word,
    /// little-endian. Every word is uniform over the ring.
    public static func mask(seed: [UInt8], stream: UInt64, count: Int) throws -> [UInt64] {
        let nonce = (0..<8).map { UInt8(truncatingIfNeeded: stream >> (8 * $0)) } + [0x77, 0x68, 0x74, 0x6c]  // "whtl"
        var words = [UInt64](repeating: 0, count: count)
        // In slices of 1 MiB of keystream (one block counter range each), so a large model's mask never holds a
        // second copy of itself in bytes.
        let wordsPerSlice = 1 << 17
        var start = 0
        while start < count {
            let n = min(wordsPerSlice, count - start)
            let bytes = try keystream(key: seed, nonce: nonce, counter: UInt32(start / 8), bytes: 8 * n)
            bytes.withUnsafeBytes { raw in
                for k in 0..<n { words[start + k] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * k, as: UInt64.self)) }
            }
            start += n
        }
        return words
    }

    /// `plaintext` sealed with ChaCha20-Poly1305 under `key`, bound to `associated` (nonce, ciphertext and tag).
    public static func seal(_ plaintext: [UInt8], key: [UInt8], associated: [UInt8]) throws -> [UInt8] {
        Array(try ChaChaPoly.seal(plaintext, using: SymmetricKey(data: key), authenticating: associated).combined)
    }

    /// The plaintext of an envelope `seal` made, if it was made under `key` for `associated` and not altered.
    public static func open(_ envelope: [UInt8], key: [UInt8], associated: [UInt8]) throws -> [UInt8] {
        do {
            return Array(try ChaChaPoly.open(try ChaChaPoly.SealedBox(combined: envelope), using: SymmetricKey(data: key),
                                             authenticating: associated))
        } catch {
            throw PrivacyError(.malformed, "an envelope does not open: altered, misrouted or sealed under another key")
        }
    }

    /// SHA-256 of the parts, each preceded by its length (so the parts' boundaries are part of what is hashed).
    public static func digest(_ parts: [[UInt8]]) -> [UInt8] {
        var hasher = SHA256()
        for p in parts {
            hasher.update(data: (0..<8).map { UInt8(truncatingIfNeeded: UInt64(p.count) >> (8 * $0)) })
            hasher.update(data: p)
        }
        return Array(hasher.finalize())
    }
}
