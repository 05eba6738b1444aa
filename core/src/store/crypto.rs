//! SQLCipher's crypto, in Rust: the provider an encrypted store uses on every target but
//! Apple's (which keep CommonCrypto).
//!
//! SQLCipher asks a *provider* for five things: AES-256-CBC over a page, HMAC (SHA-1,
//! SHA-256 or SHA-512) over a page, PBKDF2 to derive keys, random bytes, and sizes. Its
//! default provider is OpenSSL's libcrypto, which the Android library would have to carry
//! statically: 4.2 MiB that the linker cannot trim (OpenSSL 3 reaches every algorithm
//! through its provider tables), which put the `mobile` library over its 8 MiB budget.
//! This provider costs tens of KiB instead: HMAC, PBKDF2 and randomness come from `ring`,
//! which rustls links already; AES-256-CBC from RustCrypto's `aes` and `cbc` (ring has no
//! raw block cipher). The bytes on disk are SQLCipher 4's, the same as with OpenSSL or
//! CommonCrypto: a store written by one opens with the others (a test opens a file that
//! SQLCipher wrote with OpenSSL).
//!
//! SQLCipher is built to call it through `LIBSQLITE3_FLAGS` (`.cargo/config.toml`:
//! `-DSQLCIPHER_CRYPTO_CUSTOM=webwaka_sqlcipher_crypto_setup`). A build without that flag
//! (a crate that depends on this one from outside the workspace) keeps SQLCipher's
//! default, OpenSSL, and never calls this code: both read the same files.
//!
//! Written by hand, not taken from a crate: no maintained crate offers a SQLCipher
//! provider; the functions below only adapt SQLCipher's C signatures to the crates that
//! do the cryptography.
#![allow(unsafe_code)] // The provider is a C interface: raw pointers from SQLCipher.

use std::ffi::{c_char, c_int, c_uchar, c_void};
use std::num::NonZeroU32;

use aes::Aes256;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use ring::rand::SecureRandom;

// SQLCipher's constants (sqlcipher.h); they are part of its provider interface.
const SQLITE_OK: c_int = 0;
const SQLITE_ERROR: c_int = 1;
const SQLCIPHER_ENCRYPT: c_int = 1;
const SQLCIPHER_DECRYPT: c_int = 0;
const HMAC_SHA1: c_int = 0;
const HMAC_SHA256: c_int = 1;
const HMAC_SHA512: c_int = 2;
const KEY_SZ: c_int = 32; // AES-256
const BLOCK_SZ: c_int = 16; // AES's block, and CBC's IV

/// SQLCipher's `sqlcipher_provider` (crypto.h, SQLCipher 4.x), field for field.
#[repr(C)]
pub(super) struct SqlcipherProvider {
    init: Option<extern "C" fn() -> c_int>,
    shutdown: Option<extern "C" fn()>,
    get_provider_name: Option<extern "C" fn(*mut c_void) -> *const c_char>,
    add_random: Option<extern "C" fn(*mut c_void, *const c_void, c_int) -> c_int>,
    random: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, c_int) -> c_int>,
    #[allow(clippy::type_complexity)]
    hmac: Option<
        unsafe extern "C" fn(
            *mut c_void,
            c_int,
            *const c_uchar,
            c_int,
            *const c_uchar,
            c_int,
            *const c_uchar,
            c_int,
            *mut c_uchar,
        ) -> c_int,
    >,
    #[allow(clippy::type_complexity)]
    kdf: Option<
        unsafe extern "C" fn(
            *mut c_void,
            c_int,
            *const c_uchar,
            c_int,
            *const c_uchar,
            c_int,
            c_int,
            c_int,
            *mut c_uchar,
        ) -> c_int,
    >,
    #[allow(clippy::type_complexity)]
    cipher: Option<
        unsafe extern "C" fn(
            *mut c_void,
            c_int,
            *const c_uchar,
            c_int,
            *const c_uchar,
            *const c_uchar,
            c_int,
            *mut c_uchar,
        ) -> c_int,
    >,
    get_cipher: Option<extern "C" fn(*mut c_void) -> *const c_char>,
    get_key_sz: Option<extern "C" fn(*mut c_void) -> c_int>,
    get_iv_sz: Option<extern "C" fn(*mut c_void) -> c_int>,
    get_block_sz: Option<extern "C" fn(*mut c_void) -> c_int>,
    get_hmac_sz: Option<extern "C" fn(*mut c_void, c_int) -> c_int>,
    ctx_init: Option<extern "C" fn(*mut *mut c_void) -> c_int>,
    ctx_free: Option<extern "C" fn(*mut *mut c_void) -> c_int>,
    fips_status: Option<extern "C" fn(*mut c_void) -> c_int>,
    get_provider_version: Option<extern "C" fn(*mut c_void) -> *const c_char>,
    next: *mut SqlcipherProvider,
}

/// Fills in SQLCipher's provider with this module's functions. SQLCipher calls it once,
/// when SQLite initialises, through `SQLCIPHER_CRYPTO_CUSTOM`.
///
/// # Safety
/// `p` is null or points to a `sqlcipher_provider` SQLCipher allocated.
#[unsafe(no_mangle)]
pub(super) unsafe extern "C" fn webwaka_sqlcipher_crypto_setup(p: *mut SqlcipherProvider) -> c_int {
    // SAFETY: SQLCipher passes its freshly allocated provider (or we refuse a null).
    let Some(p) = (unsafe { p.as_mut() }) else {
        return SQLITE_ERROR;
    };
    p.init = None;
    p.shutdown = None;
    p.get_provider_name = Some(provider_name);
    p.add_random = Some(add_random);
    p.random = Some(random);
    p.hmac = Some(hmac);
    p.kdf = Some(kdf);
    p.cipher = Some(cipher);
    p.get_cipher = Some(cipher_name);
    p.get_key_sz = Some(key_sz);
    p.get_iv_sz = Some(block_sz);
    p.get_block_sz = Some(block_sz);
    p.get_hmac_sz = Some(hmac_sz);
    p.ctx_init = Some(ctx_noop);
    p.ctx_free = Some(ctx_noop);
    p.fips_status = Some(fips_status);
    p.get_provider_version = Some(provider_version);
    SQLITE_OK
}

/// Keeps the setup function in every build that links the store, whatever the linker's
/// order: SQLCipher's C code refers to it by name only.
pub(super) fn provider_linked() -> usize {
    std::hint::black_box(webwaka_sqlcipher_crypto_setup as *const () as usize)
}

extern "C" fn provider_name(_ctx: *mut c_void) -> *const c_char {
    c"webwaka-rust (ring, RustCrypto aes)".as_ptr()
}

extern "C" fn provider_version(_ctx: *mut c_void) -> *const c_char {
    c"ring 0.17, aes 0.9, cbc 0.2".as_ptr()
}

extern "C" fn cipher_name(_ctx: *mut c_void) -> *const c_char {
    c"aes-256-cbc".as_ptr()
}

extern "C" fn key_sz(_ctx: *mut c_void) -> c_int {
    KEY_SZ
}

extern "C" fn block_sz(_ctx: *mut c_void) -> c_int {
    BLOCK_SZ
}

extern "C" fn hmac_sz(_ctx: *mut c_void, algorithm: c_int) -> c_int {
    match hmac_algorithm(algorithm) {
        // Digest lengths are 20, 32 and 64 bytes: they fit.
        Some(algorithm) => {
            c_int::try_from(algorithm.digest_algorithm().output_len()).unwrap_or(SQLITE_ERROR)
        }
        None => 0,
    }
}

extern "C" fn ctx_noop(_ctx: *mut *mut c_void) -> c_int {
    SQLITE_OK
}

extern "C" fn fips_status(_ctx: *mut c_void) -> c_int {
    0
}

/// The system's generator is its own entropy: extra entropy is not needed.
extern "C" fn add_random(_ctx: *mut c_void, _buffer: *const c_void, _length: c_int) -> c_int {
    SQLITE_OK
}

unsafe extern "C" fn random(_ctx: *mut c_void, buffer: *mut c_void, length: c_int) -> c_int {
    // SAFETY: SQLCipher passes a writable buffer of `length` bytes.
    let Some(out) = (unsafe { bytes_mut(buffer.cast(), length) }) else {
        return SQLITE_ERROR;
    };
    match ring::rand::SystemRandom::new().fill(out) {
        Ok(()) => SQLITE_OK,
        Err(_) => SQLITE_ERROR,
    }
}

fn hmac_algorithm(algorithm: c_int) -> Option<ring::hmac::Algorithm> {
    match algorithm {
        HMAC_SHA1 => Some(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY),
        HMAC_SHA256 => Some(ring::hmac::HMAC_SHA256),
        HMAC_SHA512 => Some(ring::hmac::HMAC_SHA512),
        _ => None,
    }
}

/// HMAC of `in` followed by `in2` (which may be null), written to `out` (the digest's
/// length, as `get_hmac_sz` says).
#[allow(clippy::too_many_arguments)] // SQLCipher's signature.
unsafe extern "C" fn hmac(
    _ctx: *mut c_void,
    algorithm: c_int,
    key: *const c_uchar,
    key_sz: c_int,
    input: *const c_uchar,
    input_sz: c_int,
    input2: *const c_uchar,
    input2_sz: c_int,
    out: *mut c_uchar,
) -> c_int {
    let Some(algorithm) = hmac_algorithm(algorithm) else {
        return SQLITE_ERROR;
    };
    // SAFETY: SQLCipher passes buffers of the sizes it names; `input2` may be null.
    let (Some(key), Some(input)) = (unsafe { bytes(key, key_sz) }, unsafe {
        bytes(input, input_sz)
    }) else {
        return SQLITE_ERROR;
    };
    let mut context = ring::hmac::Context::with_key(&ring::hmac::Key::new(algorithm, key));
    context.update(input);
    if !input2.is_null() {
        // SAFETY: as above.
        let Some(input2) = (unsafe { bytes(input2, input2_sz) }) else {
            return SQLITE_ERROR;
        };
        context.update(input2);
    }
    let tag = context.sign();
    let tag = tag.as_ref();
    // SAFETY: `out` holds the digest's length (SQLCipher sizes it by `get_hmac_sz`).
    let Some(out) = (unsafe { bytes_mut(out, len_c(tag.len())) }) else {
        return SQLITE_ERROR;
    };
    out.copy_from_slice(tag);
    SQLITE_OK
}

/// PBKDF2 with the HMAC `algorithm`: `key_sz` bytes into `key`.
#[allow(clippy::too_many_arguments)] // SQLCipher's signature.
unsafe extern "C" fn kdf(
    _ctx: *mut c_void,
    algorithm: c_int,
    pass: *const c_uchar,
    pass_sz: c_int,
    salt: *const c_uchar,
    salt_sz: c_int,
    workfactor: c_int,
    key_sz: c_int,
    key: *mut c_uchar,
) -> c_int {
    let algorithm = match algorithm {
        HMAC_SHA1 => ring::pbkdf2::PBKDF2_HMAC_SHA1,
        HMAC_SHA256 => ring::pbkdf2::PBKDF2_HMAC_SHA256,
        HMAC_SHA512 => ring::pbkdf2::PBKDF2_HMAC_SHA512,
        _ => return SQLITE_ERROR,
    };
    let Some(iterations) = u32::try_from(workfactor).ok().and_then(NonZeroU32::new) else {
        return SQLITE_ERROR;
    };
    // SAFETY: SQLCipher passes buffers of the sizes it names.
    let (Some(pass), Some(salt), Some(key)) = (
        unsafe { bytes(pass, pass_sz) },
        unsafe { bytes(salt, salt_sz) },
        unsafe { bytes_mut(key, key_sz) },
    ) else {
        return SQLITE_ERROR;
    };
    ring::pbkdf2::derive(algorithm, iterations, salt, pass, key);
    SQLITE_OK
}

/// AES-256-CBC without padding over `in_sz` bytes (whole blocks: a page less its
/// reserved tail) from `input` into `out`, which may be the same buffer.
#[allow(clippy::too_many_arguments)] // SQLCipher's signature.
unsafe extern "C" fn cipher(
    _ctx: *mut c_void,
    mode: c_int,
    key: *const c_uchar,
    key_sz: c_int,
    iv: *const c_uchar,
    input: *const c_uchar,
    in_sz: c_int,
    out: *mut c_uchar,
) -> c_int {
    if key_sz != KEY_SZ || input.is_null() || in_sz < 0 || in_sz % BLOCK_SZ != 0 {
        return SQLITE_ERROR;
    }
    // SAFETY: SQLCipher passes a key of `key_sz` bytes and an IV of one block.
    let (Some(key), Some(iv)) = (unsafe { bytes(key, key_sz) }, unsafe {
        bytes(iv, BLOCK_SZ)
    }) else {
        return SQLITE_ERROR;
    };
    let len = len_usize(in_sz);
    // SAFETY: `input` holds `in_sz` bytes and `out` room for as many; they may overlap,
    // so the input is moved into `out` first and the mode runs there in place.
    let Some(buf) = (unsafe {
        std::ptr::copy(input, out, len);
        bytes_mut(out, in_sz)
    }) else {
        return SQLITE_ERROR;
    };
    let done = match mode {
        SQLCIPHER_ENCRYPT => cbc::Encryptor::<Aes256>::new_from_slices(key, iv)
            .ok()
            .and_then(|mode| mode.encrypt_padded::<NoPadding>(buf, len).ok().map(|_| ())),
        SQLCIPHER_DECRYPT => cbc::Decryptor::<Aes256>::new_from_slices(key, iv)
            .ok()
            .and_then(|mode| mode.decrypt_padded::<NoPadding>(buf).ok().map(|_| ())),
        _ => None,
    };
    match done {
        Some(()) => SQLITE_OK,
        None => SQLITE_ERROR,
    }
}

fn len_usize(len: c_int) -> usize {
    usize::try_from(len).unwrap_or(0)
}

fn len_c(len: usize) -> c_int {
    c_int::try_from(len).unwrap_or(c_int::MAX)
}

/// `len` bytes at `ptr`, or `None` for a null pointer or a negative length.
///
/// # Safety
/// A non-null `ptr` points to at least `len` readable bytes for the call's duration.
unsafe fn bytes<'a>(ptr: *const c_uchar, len: c_int) -> Option<&'a [u8]> {
    if ptr.is_null() || len < 0 {
        return None;
    }
    // SAFETY: the caller's promise.
    Some(unsafe { std::slice::from_raw_parts(ptr, len_usize(len)) })
}

/// As [`bytes`], writable.
///
/// # Safety
/// A non-null `ptr` points to at least `len` writable bytes, not otherwise borrowed.
unsafe fn bytes_mut<'a>(ptr: *mut c_uchar, len: c_int) -> Option<&'a mut [u8]> {
    if ptr.is_null() || len < 0 {
        return None;
    }
    // SAFETY: the caller's promise.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len_usize(len)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NIST SP 800-38A, F.2.5/F.2.6 (CBC-AES256): the provider's cipher is plain
    /// AES-256-CBC, encrypting and decrypting in place.
    #[test]
    fn the_cipher_is_aes_256_cbc() {
        let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
            .unwrap();
        let iv = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap();
        let plain = hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
            .unwrap();
        let expected =
            hex::decode("f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d")
                .unwrap();
        let mut buf = plain.clone();
        let run = |mode, buf: &mut Vec<u8>| unsafe {
            let p = buf.as_mut_ptr();
            cipher(
                std::ptr::null_mut(),
                mode,
                key.as_ptr(),
                32,
                iv.as_ptr(),
                p,
                32,
                p,
            )
        };
        assert_eq!(run(SQLCIPHER_ENCRYPT, &mut buf), SQLITE_OK);
        assert_eq!(buf, expected);
        assert_eq!(run(SQLCIPHER_DECRYPT, &mut buf), SQLITE_OK);
        assert_eq!(buf, plain);
    }

    #[test]
    fn bad_arguments_are_errors_not_crashes() {
        let key = [0u8; 32];
        let iv = [0u8; 16];
        let mut buf = [0u8; 17];
        let p = buf.as_mut_ptr();
        unsafe {
            // Not whole blocks, a short key, an unknown mode, a null input.
            assert_eq!(
                cipher(
                    std::ptr::null_mut(),
                    1,
                    key.as_ptr(),
                    32,
                    iv.as_ptr(),
                    p,
                    17,
                    p
                ),
                SQLITE_ERROR
            );
            assert_eq!(
                cipher(
                    std::ptr::null_mut(),
                    1,
                    key.as_ptr(),
                    16,
                    iv.as_ptr(),
                    p,
                    16,
                    p
                ),
                SQLITE_ERROR
            );
            assert_eq!(
                cipher(
                    std::ptr::null_mut(),
                    7,
                    key.as_ptr(),
                    32,
                    iv.as_ptr(),
                    p,
                    16,
                    p
                ),
                SQLITE_ERROR
            );
            assert_eq!(
                cipher(
                    std::ptr::null_mut(),
                    1,
                    key.as_ptr(),
                    32,
                    iv.as_ptr(),
                    std::ptr::null(),
                    16,
                    p
                ),
                SQLITE_ERROR
            );
            // An unknown HMAC, a zero work factor.
            assert_eq!(
                hmac(
                    std::ptr::null_mut(),
                    9,
                    key.as_ptr(),
                    32,
                    p,
                    16,
                    std::ptr::null(),
                    0,
                    p
                ),
                SQLITE_ERROR
            );
            assert_eq!(
                kdf(std::ptr::null_mut(), 2, key.as_ptr(), 32, p, 16, 0, 32, p),
                SQLITE_ERROR
            );
        }
        assert_eq!(hmac_sz(std::ptr::null_mut(), 9), 0);
        assert_eq!(hmac_sz(std::ptr::null_mut(), HMAC_SHA512), 64);
    }

    /// RFC 4231 test case 2 (HMAC-SHA-512 of "what do ya want for nothing?" with the
    /// key "Jefe"), the message given in two parts as SQLCipher does (page, then page
    /// number).
    #[test]
    fn the_hmac_covers_both_inputs() {
        let key = b"Jefe";
        let (a, b) = (b"what do ya want ", b"for nothing?");
        let mut out = [0u8; 64];
        let rc = unsafe {
            hmac(
                std::ptr::null_mut(),
                HMAC_SHA512,
                key.as_ptr(),
                4,
                a.as_ptr(),
                16,
                b.as_ptr(),
                12,
                out.as_mut_ptr(),
            )
        };
        assert_eq!(rc, SQLITE_OK);
        assert_eq!(
            hex::encode(out),
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
    }
}
