//! The `http` sink's keys: what the user writes and the plan it becomes.
//!
//! Resolved here, once, at start: the URI (host resolved to an address),
//! header values with `${VAR}` taken from the environment, the TLS client
//! configuration (roots from `tls.ca_file` or the system store), and the
//! concurrency rule. Header values may hold secrets: the plan keeps them in
//! [`Redacted`], whose `Debug` never shows them, and no error message here
//! quotes a value taken from the environment.

use crate::config::{expand_env, invalid, ConfigError, Redacted};
use crate::limiter::AdaptiveParams;
use serde::Deserialize;
use crate::sinks::util::template::Template;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

pub const TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Longest `Retry-After` honoured; a longer one is cut to this.
pub const RETRY_AFTER_MAX_MS: u64 = 300_000;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Raw,
    Ndjson,
    Influx,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RequestConfig {
    pub timeout_ms: Option<u64>,
    pub concurrency: Option<ConcurrencyConfig>,
    pub adaptive: Option<AdaptiveConfig>,
}

/// `"adaptive"` or a fixed number of requests in flight.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ConcurrencyConfig {
    Fixed(u32),
    Named(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    pub max: Option<u32>,
    pub initial: Option<u32>,
    pub window_ms: Option<u64>,
    pub tolerance: Option<f64>,
    pub decrease: Option<f64>,
}


#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Concurrency {
    Fixed(u32),
    Adaptive(AdaptiveParams),
}

/// Everything an http sink needs at run time.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    /// The URI as configured (for logs).
    pub uri: String,
    pub address: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request target: path and query.
    pub path: String,
    /// TLS client configuration and the name to verify, for `https`.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    pub encoding: Encoding,
    pub compression: Compression,
    pub headers: Vec<(String, Redacted)>,
    /// The path when it names fields (`/ingest/{tag.device}`): each
    /// record's request goes to its rendered path.
    pub path_template: Option<Template>,
    /// Headers whose values name fields (never one with a `${VAR}`).
    pub header_templates: Vec<(String, Template)>,
    pub idempotency_header: Option<String>,
    pub timeout_ms: u64,
    pub concurrency: Concurrency,
}

/// Headers the client writes itself.
const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "content-encoding",
    "content-type",
    "transfer-encoding",
    "connection",
];

/// The keys of an http sink (beside those every sink takes).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub uri: Option<String>,
    pub encoding: Option<Encoding>,
    pub compression: Option<Compression>,
    pub headers: Option<BTreeMap<String, String>>,
    pub idempotency_header: Option<String>,
    pub request: Option<RequestConfig>,
    pub tls: Option<crate::tls::TlsConfig>,
}

pub fn plan(name: &str, c: &Config) -> Result<HttpTarget, ConfigError> {
    let (uri, encoding, compression, headers, idempotency_header, request, tls) = (
        c.uri.as_deref(),
        c.encoding,
        c.compression,
        c.headers.as_ref(),
        c.idempotency_header.as_deref(),
        c.request.as_ref(),
        c.tls.as_ref(),
    );
    let key = |x: &str| format!("sinks.{name}.{x}");
    let uri = uri.ok_or_else(|| {
        invalid(
            key("uri"),
            "an http sink needs a uri (http://HOST:PORT/PATH or https://…)",
        )
    })?;
    let (https, rest) = if let Some(r) = uri.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = uri.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(invalid(
            key("uri"),
            format!("{uri:?} must start with http:// or https://"),
        ));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.contains('@') {
        return Err(invalid(
            key("uri"),
            "credentials in the uri are not supported; put them in headers from the environment",
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| invalid(key("uri"), format!("invalid port {p:?}")))?;
            (h, port)
        }
        _ => (authority, if https { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(invalid(key("uri"), "the uri has no host"));
    }
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let address = (bare_host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| invalid(key("uri"), format!("cannot resolve host {bare_host:?}")))?;

    let parsed = Template::parse(&path).map_err(|m| invalid(key("uri"), m))?;
    let (path, path_template) = match parsed.fixed() {
        Some(fixed) => (fixed.to_string(), None),
        None => (path, Some(parsed)),
    };
    let mut rendered = Vec::new();
    let mut header_templates = Vec::new();
    for (h, v) in headers.into_iter().flatten() {
        let hkey = key(&format!("headers.{h}"));
        if h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(invalid(hkey, "not a valid header name"));
        }
        if RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str()) {
            return Err(invalid(hkey, "this header is set by the sink"));
        }
        // A value from the environment is never read as a template (a
        // secret's braces are not fields).
        let mut v = v.clone();
        if !v.contains("${") {
            let t = Template::parse(&v).map_err(|m| invalid(hkey.clone(), m))?;
            if let Some(fixed) = t.fixed() {
                // `{{` and `}}` are literal braces.
                v = fixed.to_string();
            } else {
                if t.literal_text().bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(invalid(hkey, "the value holds a line break or NUL"));
                }
                header_templates.push((h.clone(), t));
                continue;
            }
        }
        let value = expand_env(&v).map_err(|m| invalid(hkey.clone(), m))?;
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(invalid(
                hkey,
                "the value (after ${VAR} expansion) holds a line break or NUL",
            ));
        }
        rendered.push((h.clone(), Redacted(value)));
    }
    let idempotency_header = match idempotency_header {
        None | Some("") => None,
        Some(h)
            if h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Some(h.to_string())
        }
        Some(_) => {
            return Err(invalid(
                key("idempotency_header"),
                "not a valid header name",
            ))
        }
    };

    let timeout_ms = request
        .and_then(|r| r.timeout_ms)
        .unwrap_or(TIMEOUT_MS_DEFAULT);
    if timeout_ms == 0 {
        return Err(invalid(key("request.timeout_ms"), "must be at least 1"));
    }
    let a = request.and_then(|r| r.adaptive.as_ref());
    let d = AdaptiveParams::default();
    let params = AdaptiveParams {
        max: a.and_then(|a| a.max).unwrap_or(d.max),
        initial: a.and_then(|a| a.initial).unwrap_or(d.initial),
        window_ms: a.and_then(|a| a.window_ms).unwrap_or(d.window_ms),
        tolerance: a.and_then(|a| a.tolerance).unwrap_or(d.tolerance),
        decrease: a.and_then(|a| a.decrease).unwrap_or(d.decrease),
    };
    if params.max == 0 || params.max > 1024 {
        return Err(invalid(
            key("request.adaptive.max"),
            "must be between 1 and 1024",
        ));
    }
    if params.window_ms == 0 || params.window_ms > 60_000 {
        return Err(invalid(
            key("request.adaptive.window_ms"),
            "must be between 1 and 60000",
        ));
    }
    if params.tolerance.is_nan() || params.tolerance < 1.0 {
        return Err(invalid(
            key("request.adaptive.tolerance"),
            "must be at least 1.0 (a ratio to the baseline latency)",
        ));
    }
    if params.decrease.is_nan() || params.decrease <= 0.0 || params.decrease >= 1.0 {
        return Err(invalid(
            key("request.adaptive.decrease"),
            "must be between 0 and 1 (exclusive)",
        ));
    }
    let concurrency = match request.and_then(|r| r.concurrency.as_ref()) {
        None => Concurrency::Adaptive(params),
        Some(ConcurrencyConfig::Named(s)) if s == "adaptive" => Concurrency::Adaptive(params),
        Some(ConcurrencyConfig::Fixed(n)) if (1..=1024).contains(n) => {
            if a.is_some() {
                return Err(invalid(
                    key("request.adaptive"),
                    "only applies with concurrency = \"adaptive\"",
                ));
            }
            Concurrency::Fixed(*n)
        }
        Some(_) => {
            return Err(invalid(
                key("request.concurrency"),
                "must be \"adaptive\" or a number from 1 to 1024",
            ))
        }
    };

    let tls_plan = if https {
        let (config, verify) = crate::tls::from_config(&key("tls"), tls)?;
        let server_name =
            rustls_pki_types::ServerName::try_from(bare_host.to_string()).map_err(|_| {
                invalid(
                    key("uri"),
                    format!("{bare_host:?} is not a valid TLS server name"),
                )
            })?;
        if !verify {
            tracing::warn!(sink = name, "tls.verify = false: the server's certificate is NOT checked; anyone on the path can read and change what this sink sends");
        }
        Some((config, server_name))
    } else {
        if tls.is_some() {
            return Err(invalid(key("tls"), "tls settings need an https:// uri"));
        }
        None
    };

    Ok(HttpTarget {
        // For logs and dead-letter notes: a query string may hold a token.
        uri: format!(
            "{}://{authority}{}",
            if https { "https" } else { "http" },
            match path.split_once('?') {
                Some((p, _)) => format!("{p}?…"),
                None => path.clone(),
            }
        ),
        address,
        host: authority.to_string(),
        path,
        tls: tls_plan,
        encoding: encoding.unwrap_or_default(),
        compression: compression.unwrap_or_default(),
        headers: rendered,
        path_template,
        header_templates,
        idempotency_header,
        timeout_ms,
        concurrency,
    })
}

/// Replaces `${VAR}` with the variable's value (`$$` is a literal `$`).
/// The error names the variable, never a value.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_names_the_variable_not_the_value() {
        std::env::set_var("UPDRAFT_TEST_TOKEN", "s3cret");
        assert_eq!(
            expand_env("Bearer ${UPDRAFT_TEST_TOKEN}").unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(expand_env("cost $$5 $x").unwrap(), "cost $5 $x");
        let e = expand_env("${UPDRAFT_TEST_NOT_SET_ANYWHERE}").unwrap_err();
        assert!(e.contains("UPDRAFT_TEST_NOT_SET_ANYWHERE"), "{e}");
        let r = Redacted("s3cret".into());
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn uri_parts() {
        let c = Config {
            uri: Some("http://127.0.0.1:8428/write?db=x".into()),
            idempotency_header: Some("Idempotency-Key".into()),
            ..Config::default()
        };
        let t = plan("c", &c).unwrap();
        assert_eq!(t.address, "127.0.0.1:8428".parse::<SocketAddr>().unwrap());
        assert_eq!(t.path, "/write?db=x");
        assert_eq!(t.host, "127.0.0.1:8428");
        assert!(matches!(t.concurrency, Concurrency::Adaptive(_)));
        let c = Config {
            uri: Some("ftp://x".into()),
            ..Config::default()
        };
        let e = plan("c", &c).unwrap_err();
        assert!(e.to_string().starts_with("sinks.c.uri"), "{e}");
    }
}
