//! TLS for the collector's client connections (the http sink, MQTT), with
//! rustls: the keys a user writes (`tls.ca_file`, `tls.cert_file` and
//! `tls.key_file` for a client certificate, `tls.verify`) and the client
//! configuration they become, checked at start; and for the one server
//! (the `updraft` source: its certificate and key, and optionally the CA
//! its clients' certificates must chain to). The connections drive
//! rustls over their own io_uring sockets (rustls is sans-I/O).

use crate::config::{invalid, ConfigError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A `[….tls]` table.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CAs to trust (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and its key, for brokers and endpoints
    /// that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub verify: Option<bool>,
}

impl TlsConfig {
    /// The client certificate and key files, when both are set.
    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

/// A peer's url resolved once at start: its address, the host as written
/// (the TLS server name) and whether the url asks for TLS.
pub struct Endpoint {
    pub address: std::net::SocketAddr,
    pub host: String,
    pub tls: bool,
}

/// The url schemes of a kind of peer, with their default ports, and what
/// the peer is called in errors ("broker", "server").
pub struct Schemes {
    pub plain: (&'static str, u16),
    pub tls: (&'static str, u16),
    pub peer: &'static str,
}

/// Resolves `SCHEME://HOST[:PORT]` once; the error says what is wrong.
pub fn endpoint(url: &str, s: &Schemes) -> Result<Endpoint, String> {
    use std::net::ToSocketAddrs;
    let (plain, tls) = (s.plain.0, s.tls.0);
    let (tls, port, rest) = if let Some(r) = url.strip_prefix(&format!("{plain}://")) {
        (false, s.plain.1, r)
    } else if let Some(r) = url.strip_prefix(&format!("{tls}://")) {
        (true, s.tls.1, r)
    } else {
        return Err(format!("{url:?} must start with {plain}:// or {tls}://"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!(
            "the url is {plain}://HOST:PORT (credentials have their own keys)"
        ));
    }
    let (host, with_port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, authority.to_string()),
        _ => (authority, format!("{authority}:{port}")),
    };
    let address = with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve {authority:?}"))?;
    Ok(Endpoint {
        address,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        tls,
    })
}

/// The TLS client settings for an endpoint (`key` names the `tls` table):
/// none for a plain url, where a `tls` table is refused.
pub fn for_endpoint(
    key: &str,
    e: &Endpoint,
    t: Option<&TlsConfig>,
    s: &Schemes,
) -> Result<Option<ClientTls>, ConfigError> {
    if !e.tls {
        return match t {
            Some(_) => Err(invalid(
                key,
                format!("tls settings need a {}:// url", s.tls.0),
            )),
            None => Ok(None),
        };
    }
    let (config, verify) = from_config(key, t)?;
    if !verify {
        tracing::warn!(
            key,
            "tls.verify = false: the {}'s certificate is NOT checked",
            s.peer
        );
    }
    let name = rustls_pki_types::ServerName::try_from(e.host.clone())
        .map_err(|_| invalid(key, format!("{:?} is not a valid TLS server name", e.host)))?;
    Ok(Some((config, name)))
}

/// The client configuration for a `tls` table (`key` names it; absent:
/// the defaults, the system's roots), and whether certificates are checked.
pub fn from_config(
    key: &str,
    t: Option<&TlsConfig>,
) -> Result<(Arc<rustls::ClientConfig>, bool), ConfigError> {
    let verify = t.and_then(|t| t.verify).unwrap_or(true);
    if let Some(t) = t {
        match (&t.cert_file, &t.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    format!("{key}.key_file"),
                    "a client certificate needs its key_file",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    format!("{key}.cert_file"),
                    "a key_file needs its cert_file",
                ))
            }
            _ => {}
        }
    }
    let config = client_config(
        key,
        t.and_then(|t| t.ca_file.as_deref()),
        verify,
        t.and_then(|t| t.client_cert()),
    )?;
    Ok((config, verify))
}

/// A rustls client configuration: roots from `ca_file` (or the system's),
/// a client certificate when one is given, no verification with `verify =
/// false`. Errors name `key` (the tls table) and the file.
pub fn client_config(
    key: &str,
    ca_file: Option<&Path>,
    verify: bool,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(key, format!("TLS setup: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| {
                invalid(
                    format!("{key}.ca_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            for c in certs {
                let c = c.map_err(|e| {
                    invalid(
                        format!("{key}.ca_file"),
                        format!("{}: not a PEM certificate: {e}", path.display()),
                    )
                })?;
                roots.add(c).map_err(|e| {
                    invalid(
                        format!("{key}.ca_file"),
                        format!("{}: unusable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            if roots.is_empty() {
                return Err(invalid(
                    format!("{key}.ca_file"),
                    format!("{} holds no certificate", path.display()),
                ));
            }
        }
        None if verify => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(invalid(format!("{key}.ca_file"), "no system root certificates found: install the ca-certificates package or set tls.ca_file"));
            }
        }
        None => {}
    }
    let builder = builder.with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key_file)) => {
            let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
                .map_err(|e| {
                    invalid(
                        format!("{key}.cert_file"),
                        format!("cannot read {}: {e}", cert.display()),
                    )
                })?
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    invalid(
                        format!("{key}.cert_file"),
                        format!("{}: not a PEM certificate: {e}", cert.display()),
                    )
                })?;
            if chain.is_empty() {
                return Err(invalid(
                    format!("{key}.cert_file"),
                    format!("{} holds no certificate", cert.display()),
                ));
            }
            let private =
                rustls_pki_types::PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                    invalid(
                        format!("{key}.key_file"),
                        format!("{}: not a PEM private key: {e}", key_file.display()),
                    )
                })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                invalid(
                    key,
                    format!("the client certificate and key do not go together: {e}"),
                )
            })?
        }
    };
    if !verify {
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(NoVerification(provider)));
    }
    Ok(Arc::new(config))
}

/// The PEM certificates in `path` (an error names `key` and the file).
fn pem_certs(
    key: &str,
    path: &Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            invalid(
                key,
                format!("{}: not a PEM certificate: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{} holds no certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// A rustls server configuration from a source's `tls` table (`key`
/// names it): `cert_file` and `key_file` (required), and `ca_file`, which
/// makes a client certificate signed by one of its CAs required.
pub fn server_config(key: &str, t: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    let (Some(cert), Some(key_file)) = (&t.cert_file, &t.key_file) else {
        return Err(invalid(
            format!("{key}.cert_file"),
            "a TLS server needs its cert_file and key_file",
        ));
    };
    if t.verify.is_some() {
        return Err(invalid(
            format!("{key}.verify"),
            "a server does not verify; set ca_file to require client certificates",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(key, format!("TLS setup: {e}")))?;
    let builder = match &t.ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(&format!("{key}.ca_file"), ca)? {
                roots.add(c).map_err(|e| {
                    invalid(
                        format!("{key}.ca_file"),
                        format!("{}: unusable CA certificate: {e}", ca.display()),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| invalid(format!("{key}.ca_file"), format!("TLS setup: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = pem_certs(&format!("{key}.cert_file"), cert)?;
    let private = rustls_pki_types::PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        invalid(
            format!("{key}.key_file"),
            format!("{}: not a PEM private key: {e}", key_file.display()),
        )
    })?;
    let config = builder.with_single_cert(chain, private).map_err(|e| {
        invalid(
            key,
            format!("the certificate and key do not go together: {e}"),
        )
    })?;
    Ok(Arc::new(config))
}

/// `tls.verify = false`: accepts any certificate (signatures on the
/// handshake are still checked, so the session keys are the server's).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Where a TLS client connects: its configuration and the name the
/// server's certificate must carry.
pub type ClientTls = (
    Arc<rustls::ClientConfig>,
    rustls_pki_types::ServerName<'static>,
);

/// A connection, plain TCP or TLS (as a client, or as a server for the
/// native protocol's source), over the shard's io_uring: one
/// task may read while another writes (neither holds the TLS state across
/// an await). Only the writer writes to the socket: what TLS itself has to
/// send while reading goes out with the next write.
pub struct Link {
    stream: crate::io::TcpStream,
    tls: Option<std::cell::RefCell<rustls::Connection>>,
    /// Ciphertext on its way out (the writer's) and in (the reader's).
    out: std::cell::Cell<Vec<u8>>,
    inb: std::cell::Cell<Vec<u8>>,
}

impl Link {
    /// Connects and, with TLS, completes the handshake.
    pub async fn connect(
        address: std::net::SocketAddr,
        tls: Option<&ClientTls>,
    ) -> Result<Link, String> {
        let link = Link::connect_plain(address).await?;
        match tls {
            Some(t) => link.start_tls(t).await,
            None => Ok(link),
        }
    }

    /// Connects without TLS (a protocol that greets in the clear first,
    /// as NATS does, calls [`Link::start_tls`] after the greeting).
    pub async fn connect_plain(address: std::net::SocketAddr) -> Result<Link, String> {
        let stream = crate::io::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Link {
            stream,
            tls: None,
            out: std::cell::Cell::new(Vec::new()),
            inb: std::cell::Cell::new(Vec::new()),
        })
    }

    /// An accepted connection, plain until [`Link::accept_tls`].
    pub fn from_stream(stream: crate::io::TcpStream) -> Link {
        Link {
            stream,
            tls: None,
            out: std::cell::Cell::new(Vec::new()),
            inb: std::cell::Cell::new(Vec::new()),
        }
    }

    /// The socket back (the connection's owner closes it).
    pub fn into_stream(self) -> crate::io::TcpStream {
        self.stream
    }

    /// Starts TLS on a plain connection and completes the handshake.
    pub async fn start_tls(mut self, (config, name): &ClientTls) -> Result<Link, String> {
        let conn = rustls::ClientConnection::new(config.clone(), name.clone())
            .map_err(|e| format!("TLS: {e}"))?;
        self.tls = Some(std::cell::RefCell::new(conn.into()));
        self.handshake().await?;
        Ok(self)
    }

    /// Serves TLS on an accepted connection and completes the handshake.
    pub async fn accept_tls(&mut self, config: &Arc<rustls::ServerConfig>) -> Result<(), String> {
        let conn =
            rustls::ServerConnection::new(config.clone()).map_err(|e| format!("TLS: {e}"))?;
        self.tls = Some(std::cell::RefCell::new(conn.into()));
        self.handshake().await
    }

    async fn handshake(&self) -> Result<(), String> {
        let link = self;
        if let Some(t) = &link.tls {
            while t.borrow().is_handshaking() {
                link.flush()
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                let wants_read = {
                    let t = t.borrow();
                    t.is_handshaking() && t.wants_read()
                };
                if wants_read && link.fill().await? == 0 {
                    return Err("the peer closed the connection during the TLS handshake".into());
                }
            }
            link.flush().await.map_err(|e| format!("TLS: {e}"))?;
        }
        Ok(())
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Writes what TLS has to send.
    async fn flush(&self) -> std::io::Result<()> {
        let Some(t) = &self.tls else { return Ok(()) };
        loop {
            let mut out = self.out.take();
            out.clear();
            {
                let mut t = t.borrow_mut();
                while t.wants_write() && out.len() < 256 * 1024 {
                    t.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                self.out.set(out);
                return Ok(());
            }
            let (res, out) = self.stream.write_all(out).await;
            self.out.set(out);
            res?;
        }
    }

    /// Reads ciphertext from the socket into TLS; 0 when the peer closed.
    async fn fill(&self) -> Result<usize, String> {
        let t = self.tls.as_ref().expect("a TLS link");
        let mut inb = self.inb.take();
        inb.clear();
        inb.reserve(16 * 1024);
        let (res, inb) = self.stream.read(inb).await;
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                self.inb.set(inb);
                return Err(format!("read failed: {e}"));
            }
        };
        let mut data = &inb[..n];
        let mut failed = None;
        {
            let mut t = t.borrow_mut();
            while !data.is_empty() {
                if let Err(e) = t.read_tls(&mut data) {
                    failed = Some(format!("TLS: {e}"));
                    break;
                }
                if let Err(e) = t.process_new_packets() {
                    failed = Some(format!("TLS: {e}"));
                    break;
                }
            }
        }
        self.inb.set(inb);
        match failed {
            Some(why) => {
                let _ = self.flush().await; // the alert tells the peer why
                Err(why)
            }
            None => Ok(n),
        }
    }

    /// Writes `buf[range]` whole; gives the buffer back.
    pub async fn write(
        &self,
        buf: Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> (std::io::Result<()>, Vec<u8>) {
        use crate::io::BoundedBuf;
        use std::io::Write;
        let Some(t) = &self.tls else {
            let (res, slice) = self.stream.write_all(buf.slice(range)).await;
            return (res, slice.into_inner());
        };
        let mut at = range.start;
        loop {
            if at < range.end {
                // rustls buffers a bounded amount of plaintext: feed it in
                // pieces, writing the records out in between.
                match t.borrow_mut().writer().write(&buf[at..range.end]) {
                    Ok(n) => at += n,
                    Err(e) => return (Err(e), buf),
                }
            }
            if let Err(e) = self.flush().await {
                return (Err(e), buf);
            }
            if at >= range.end {
                return (Ok(()), buf);
            }
        }
    }

    /// Reads what the peer sent next into `buf[have..]` (which must have
    /// room); returns how many bytes came, 0 when the peer closed.
    pub async fn read(&self, buf: Vec<u8>, have: usize) -> (Result<usize, String>, Vec<u8>) {
        use crate::io::BoundedBuf;
        use std::io::Read;
        let Some(t) = &self.tls else {
            let (res, slice) = self.stream.read(buf.slice(have..)).await;
            return (
                res.map_err(|e| format!("read failed: {e}")),
                slice.into_inner(),
            );
        };
        let mut buf = buf;
        loop {
            let got = t.borrow_mut().reader().read(&mut buf[have..]);
            match got {
                Ok(n) => return (Ok(n), buf),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return (Err(format!("TLS: {e}")), buf),
            }
            match self.fill().await {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(why) => return (Err(why), buf),
            }
        }
    }
}
