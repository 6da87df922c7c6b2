//! TLS for the stand-in: a throw-away CA and a server certificate for `127.0.0.1`, `::1` and localhost,
//! so clients verify the server exactly as they verify a real API server (no "insecure" switch).

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use super::StandInError;

/// A CA (PEM, for kubeconfigs and `ca.crt`) and the server certificate and key it signed.
pub struct TlsMaterial {
    pub ca_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

fn tls_err(e: impl std::fmt::Display) -> StandInError {
    StandInError::Tls(e.to_string())
}

impl TlsMaterial {
    /// Generates a fresh CA and server certificate.
    pub fn generate() -> Result<Arc<Self>, StandInError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "netdrop stand-in CA");
        let ca_key = KeyPair::generate().map_err(tls_err)?;
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls_err)?;

        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(tls_err)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = params.signed_by(&key, &ca).map_err(tls_err)?;
        Ok(Arc::new(Self {
            ca_pem: ca.pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }))
    }

    /// The CA as kubeconfig `certificate-authority-data`.
    pub fn ca_pem_base64(&self) -> String {
        base64(self.ca_pem.as_bytes())
    }

    pub(crate) fn acceptor(&self) -> Result<TlsAcceptor, StandInError> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .map_err(tls_err)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Standard base64 (RFC 4648) with padding; small enough not to need a crate.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(super::base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(super::base64(b"foob"), "Zm9vYg==");
    }
}
