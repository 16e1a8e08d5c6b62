// SPDX-License-Identifier: Apache-2.0
//! Fetching from addresses that tenants choose, safely: image references come from API
//! objects, so without a policy a reference could make the provider fetch from the host's
//! metadata service or a loopback admin port and hand the answer back as a disk.
//!
//! [`Policy`] refuses destinations that resolve to loopback, private, link-local, CGNAT,
//! multicast or unspecified addresses unless the host is trusted by configuration, and
//! [`get`] follows redirects itself, checking every hop (and dropping credentials when a
//! redirect leaves the original host). A name that resolves differently between the check
//! and the connection (DNS rebinding) is not caught; trusted hosts and a resolver the tenant
//! does not control close that gap.

use std::{
    net::{IpAddr, Ipv4Addr, ToSocketAddrs},
    time::Duration,
};

use ureq::http::Uri;

/// How many redirects a fetch follows.
const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a body may take to arrive (an image of many GiB on a slow link).
const BODY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why a destination is refused or a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The policy refuses the destination: retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// The request failed (network, server): a retry may succeed.
    #[error("{0}")]
    Failed(String),
}

/// Which destinations may be fetched from.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Hosts (`host` or `host:port`) fetched from even if they resolve to internal addresses.
    pub trusted_hosts: Vec<String>,
}

impl Policy {
    /// Checks the destination of `url`.
    pub fn check(&self, url: &str) -> Result<(), FetchError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| FetchError::Refused(format!("{url}: not a URL: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| FetchError::Refused(format!("{url}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            Some("https") => 443,
            _ => return Err(FetchError::Refused(format!("{url}: only http and https"))),
        });
        let trusted = self
            .trusted_hosts
            .iter()
            .any(|t| *t == host || *t == format!("{host}:{port}"));
        if trusted {
            return Ok(());
        }
        let addresses: Vec<IpAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| FetchError::Failed(format!("{url}: resolving {host}: {e}")))?
            .map(|a| a.ip())
            .collect();
        if let Some(internal) = addresses.iter().find(|ip| is_internal(ip)) {
            return Err(FetchError::Refused(format!(
                "{url}: {host} resolves to the internal address {internal}; list it in the trusted image hosts to allow it"
            )));
        }
        Ok(())
    }
}

/// Whether `ip` is not a public unicast address.
pub fn is_internal(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(&v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
        }
    }
}

fn internal_v4(ip: &Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || a == 0
}

/// An agent that does not follow redirects itself and does not turn HTTP errors into `Err`.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_recv_body(Some(BODY_TIMEOUT))
        .max_redirects(0)
        .http_status_as_error(false)
        .build()
        .into()
}

/// GETs `url` with `headers`, following redirects after checking each hop against `policy`.
/// `credentials` (header name, value) go only to the original host. Returns the final
/// response, whatever its status.
pub fn get(
    agent: &ureq::Agent,
    policy: &Policy,
    url: &str,
    headers: &[(&str, &str)],
    credentials: Option<(&str, &str)>,
) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
    let origin = authority(url);
    let mut current = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        policy.check(&current)?;
        let mut request = agent.get(&current);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some((name, value)) = credentials
            && authority(&current) == origin
        {
            request = request.header(name, value);
        }
        let response = request
            .call()
            .map_err(|e| FetchError::Failed(format!("GET {current}: {e}")))?;
        if !response.status().is_redirection() {
            return Ok(response);
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| FetchError::Failed(format!("GET {current}: redirect without a location")))?;
        current = resolve(&current, location);
    }
    Err(FetchError::Failed(format!(
        "GET {url}: more than {MAX_REDIRECTS} redirects"
    )))
}

fn authority(url: &str) -> Option<String> {
    url.parse::<Uri>()
        .ok()?
        .authority()
        .map(|a| a.as_str().to_string())
}

/// `location` relative to `base` (absolute, or an absolute path on the same origin).
fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    match base.parse::<Uri>() {
        Ok(uri) if location.starts_with('/') => format!(
            "{}://{}{location}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map_or("", |a| a.as_str())
        ),
        _ => location.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn internal_destinations_are_refused_unless_trusted() {
        let policy = Policy::default();
        for url in [
            "http://127.0.0.1:8080/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/x",
            "http://[::1]:5000/x",
            "http://[fd00::1]/x",
            "http://100.64.0.1/x",
            "http://0.0.0.0/x",
            "http://localhost/x",
        ] {
            assert!(matches!(policy.check(url), Err(FetchError::Refused(_))), "{url}");
        }
        assert!(policy.check("https://93.184.215.14/os.img").is_ok());
        assert!(matches!(
            policy.check("ftp://93.184.215.14/x"),
            Err(FetchError::Refused(_))
        ));
        let trusted = Policy {
            trusted_hosts: vec!["127.0.0.1".into(), "10.1.2.3:5000".into()],
        };
        assert!(trusted.check("http://127.0.0.1:8080/x").is_ok());
        assert!(trusted.check("http://10.1.2.3:5000/x").is_ok());
        assert!(trusted.check("http://10.1.2.3:5001/x").is_err());
        assert!(is_internal(&IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn redirect_locations_resolve() {
        assert_eq!(
            resolve("https://a.example/v2/x", "/blobs/y"),
            "https://a.example/blobs/y"
        );
        assert_eq!(
            resolve("https://a.example/v2/x", "https://cdn.example/z"),
            "https://cdn.example/z"
        );
    }
}
