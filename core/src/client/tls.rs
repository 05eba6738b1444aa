//! TLS for `https://` and `wss://` servers: one rustls configuration shared by the HTTP
//! and WebSocket transports, so both trust the same roots.
//!
//! rustls with the `ring` provider (pure Rust and assembly: it cross-compiles for
//! Android and iOS with nothing more than the C compiler the NDK and Xcode bring) and
//! Mozilla's root certificates compiled in (`webpki-roots`: no platform trust-store
//! hook to initialise, the same answer on every OS). Apps that talk to a server with a
//! private CA add its root in [`ClientConfig::tls_root_certificates`](super::ClientConfig).
//! Plain `http://` and `ws://` URLs (the local server) do not use any of this.
//!
//! Process-wide side effect: the first client opened installs `ring` as rustls's
//! default crypto provider when the process has none. reqwest, built with TLS but
//! without a provider of its own (as here), panics in `reqwest::Client::new()` when
//! no default is installed; an app that builds its own reqwest clients in the same
//! process gets a working default this way (one that chose another provider keeps it).

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::ClientError;

/// The field named in errors about extra roots.
const FIELD: &str = "tls_root_certificates";

/// The rustls client configuration: the bundled roots plus `extra_pem` (each entry a
/// PEM text holding one or more certificates).
pub(crate) fn client_config(
    extra_pem: &[String],
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (i, pem) in extra_pem.iter().enumerate() {
        let invalid = |message: String| ClientError::InvalidInput {
            field: format!("{FIELD}[{i}]"),
            message,
        };
        let mut found = 0usize;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("not a usable root certificate: {e}")))?;
            found = found.saturating_add(1);
        }
        if found == 0 {
            return Err(invalid("no `BEGIN CERTIFICATE` block".into()));
        }
    }
    install_default_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::InvalidInput {
            field: FIELD.into(),
            message: format!("TLS set-up failed: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Installs `ring` as the process's default rustls provider unless one is installed.
pub fn install_default_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Lost a race with another installer: theirs stays, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_roots_alone_make_a_config() {
        let config = client_config(&[]).unwrap();
        assert!(config.alpn_protocols.is_empty());
    }

    #[test]
    fn a_bad_extra_root_names_its_index() {
        let err = client_config(&["hello".into()]).unwrap_err();
        assert!(
            matches!(&err, ClientError::InvalidInput { field, .. } if field == "tls_root_certificates[0]"),
            "{err:?}"
        );
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = client_config(&[garbled.into()]).unwrap_err();
        assert!(matches!(err, ClientError::InvalidInput { .. }), "{err:?}");
    }
}
