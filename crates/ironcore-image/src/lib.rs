// SPDX-License-Identifier: Apache-2.0
//! IronCore OS images from OCI registries: resolve a reference, pick the `linux/<arch>`
//! manifest of an index, classify the layers by IronCore's media types, and download a layer
//! with its digest verified.
//!
//! IronCore's image format (ironcore-image's `OCI-SPEC.md`): an OCI image manifest whose config
//! has media type `application/vnd.ironcore.image.config.v1+json` (`{"commandLine": ...}`) and
//! whose layers have media types `application/vnd.ironcore.image.{rootfs,kernel,initramfs,
//! squashfs,uki,iso}` (the legacy `…v1alpha1.*` forms are accepted too). The rootfs layer is a
//! raw disk image.
//!
//! The client speaks the OCI distribution API with anonymous access: a registry that answers
//! 401 with a `Bearer` challenge gets an anonymous pull token from the realm it names. Plain
//! HTTP is used only for loopback registries and for registries listed as insecure.
//!
//! Every call blocks (ureq): run it off async workers.

use std::{
    fs::OpenOptions,
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub mod net;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use net::{FetchError, Policy};

/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// IronCore image config.
pub const MEDIA_CONFIG: &str = "application/vnd.ironcore.image.config.v1+json";

/// Manifests and indexes are small; anything bigger is not one.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// An error with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference {
        /// The reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// The registry could not be reached or answered with an error.
    #[error("{0}")]
    Registry(String),
    /// The image is not an IronCore image we can use.
    #[error("{0}")]
    Image(String),
    /// The destination is not allowed (an internal address that is not trusted).
    #[error("{0}")]
    Refused(String),
    /// Local I/O.
    #[error("{0}")]
    Io(String),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, Error>;

/// A parsed reference: `[registry/]repository[:tag][@sha256:digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (and port).
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag or digest to fetch (the digest wins when both are given).
    pub reference: String,
}

impl Reference {
    /// Parses `text` the way container tools do (`docker.io` and `library/` by default).
    pub fn parse(text: &str) -> Result<Reference> {
        let invalid = |reason: &str| Error::Reference {
            reference: text.chars().take(200).collect(),
            reason: reason.to_string(),
        };
        if text.is_empty()
            || text.len() > 1024
            || text.contains("://")
            || text.chars().any(char::is_whitespace)
        {
            return Err(invalid("expected [registry/]repository[:tag][@sha256:digest]"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| invalid("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid("a sha256 digest has 64 hexadecimal characters"));
                }
                (rest, Some(digest.to_ascii_lowercase()))
            }
            None => (text, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo.to_string(), Some(tag.to_string())),
            _ => (path, None),
        };
        let valid_component = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(invalid("the repository must be lowercase path components"));
        }
        if let Some(tag) = &tag
            && (tag.is_empty()
                || tag.len() > 128
                || !tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(invalid("invalid tag"));
        }
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        Ok(Reference {
            registry,
            repository,
            reference: digest.or(tag).unwrap_or_else(|| "latest".to_string()),
        })
    }

    fn base_url(&self, insecure: &[String]) -> String {
        let host = if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        };
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let plain = matches!(name, "localhost" | "127.0.0.1" | "[::1]") || insecure.iter().any(|i| i == host);
        format!("{}://{host}", if plain { "http" } else { "https" })
    }
}

/// A layer of an IronCore image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Platform (index entries only).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// e.g. `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// e.g. `linux`.
    #[serde(default)]
    pub os: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// The layers of an IronCore image that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Where it came from.
    pub reference: Reference,
    /// The manifest's digest (`sha256:<hex>`): what the reference resolved to.
    pub digest: String,
    /// The IronCore image config (`commandLine`), if the manifest names one.
    pub config: Option<Descriptor>,
    /// The raw disk image.
    pub rootfs: Option<Descriptor>,
    /// A kernel for direct boot.
    pub kernel: Option<Descriptor>,
    /// Its initramfs.
    pub initramfs: Option<Descriptor>,
}

/// A registry client.
pub struct Client {
    agent: ureq::Agent,
    insecure: Vec<String>,
    policy: Policy,
}

impl From<FetchError> for Error {
    fn from(err: FetchError) -> Self {
        match err {
            FetchError::Refused(m) => Error::Refused(m),
            FetchError::Failed(m) => Error::Registry(m),
        }
    }
}

impl Client {
    /// A client that uses plain HTTP for loopback registries and for `insecure` hosts
    /// (`host[:port]`), and fetches only from destinations `policy` allows.
    pub fn new(insecure: Vec<String>, policy: Policy) -> Client {
        Client {
            agent: net::agent(),
            insecure,
            policy,
        }
    }

    /// Resolves `reference` to an IronCore image for `architecture` (`amd64` if empty).
    pub fn resolve(&self, reference: &str, architecture: &str) -> Result<Image> {
        let reference = Reference::parse(reference)?;
        let architecture = if architecture.is_empty() {
            "amd64"
        } else {
            architecture
        };
        let mut session = Session::new(self, &reference);
        let (mut manifest, mut digest) = session.manifest(&reference.reference)?;
        if manifest.media_type == MEDIA_OCI_INDEX || !manifest.manifests.is_empty() {
            let entry = manifest
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        p.architecture == architecture && (p.os.is_empty() || p.os == "linux")
                    })
                })
                .ok_or_else(|| Error::Image(format!("the image index has no linux/{architecture} manifest")))?
                .clone();
            (manifest, digest) = session.manifest(&entry.digest)?;
        }
        if manifest.media_type != MEDIA_OCI_MANIFEST && !manifest.media_type.is_empty() {
            return Err(Error::Image(format!(
                "unsupported manifest media type {:?} (an OCI image manifest is needed)",
                manifest.media_type
            )));
        }
        if let Some(config) = &manifest.config
            && config.media_type != MEDIA_CONFIG
        {
            return Err(Error::Image(format!(
                "not an IronCore image: config media type {:?}",
                config.media_type
            )));
        }
        let mut image = Image {
            reference: reference.clone(),
            digest,
            config: manifest.config.clone(),
            rootfs: None,
            kernel: None,
            initramfs: None,
        };
        for layer in manifest.layers {
            let kind = layer
                .media_type
                .strip_prefix("application/vnd.ironcore.image.")
                .map(|k| k.strip_prefix("rootfs.v1alpha1.").map_or(k, |_| "rootfs"))
                .map(|k| k.split('.').next().unwrap_or(k).to_string());
            match kind.as_deref() {
                Some("rootfs") => image.rootfs = Some(layer),
                Some("kernel") => image.kernel = Some(layer),
                Some("initramfs") => image.initramfs = Some(layer),
                Some("squashfs" | "uki" | "iso") => {}
                _ => {
                    return Err(Error::Image(format!(
                        "unknown layer media type {:?} (not an IronCore image layer)",
                        layer.media_type
                    )));
                }
            }
        }
        Ok(image)
    }

    /// Downloads `layer` of `image` into a new file `dest` (mode 0600, fsynced), checking its
    /// size and digest; a partial or wrong file is removed.
    pub fn download(&self, image: &Image, layer: &Descriptor, dest: &Path) -> Result<()> {
        let mut session = Session::new(self, &image.reference);
        let url = format!(
            "{}/v2/{}/blobs/{}",
            image.reference.base_url(&self.insecure),
            image.reference.repository,
            layer.digest
        );
        let mut reader = session.get(&url, "*/*")?;
        let result = (|| -> io::Result<String> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dest)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > layer.size {
                    return Err(io::Error::other(format!(
                        "more than the {} bytes announced",
                        layer.size
                    )));
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
            if total != layer.size {
                return Err(io::Error::other(format!(
                    "{total} bytes, {} announced",
                    layer.size
                )));
            }
            file.sync_all()?;
            Ok(format!("sha256:{}", hex(&hasher.finalize())))
        })();
        let failed = |reason: String| {
            let _ = std::fs::remove_file(dest);
            Err(Error::Registry(format!("downloading {}: {reason}", layer.digest)))
        };
        match result {
            Ok(digest) if digest == layer.digest => Ok(()),
            Ok(digest) => failed(format!("content has digest {digest}")),
            Err(e) => failed(e.to_string()),
        }
    }
}

/// Requests to one repository, with the token it needed.
struct Session<'a> {
    client: &'a Client,
    reference: &'a Reference,
    token: Option<String>,
}

impl<'a> Session<'a> {
    fn new(client: &'a Client, reference: &'a Reference) -> Session<'a> {
        Session {
            client,
            reference,
            token: None,
        }
    }

    fn manifest(&mut self, reference: &str) -> Result<(Manifest, String)> {
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.reference.base_url(&self.client.insecure),
            self.reference.repository
        );
        let reader = self.get(&url, &format!("{MEDIA_OCI_MANIFEST}, {MEDIA_OCI_INDEX}"))?;
        let mut bytes = Vec::new();
        reader
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::Registry(format!("GET {url}: {e}")))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::Image(format!(
                "GET {url}: a manifest larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && digest != reference {
            return Err(Error::Registry(format!("GET {url}: content has digest {digest}")));
        }
        let manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Image(format!("GET {url}: not a manifest: {e}")))?;
        Ok((manifest, digest))
    }

    /// GET with the accept header, fetching an anonymous token on a Bearer challenge; every
    /// hop is checked against the policy and the token goes to the registry only.
    fn get(&mut self, url: &str, accept: &str) -> Result<Box<dyn Read + Send>> {
        for _ in 0..2 {
            let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
            let credentials = bearer.as_deref().map(|b| ("Authorization", b));
            let response = net::get(
                &self.client.agent,
                &self.client.policy,
                url,
                &[("Accept", accept)],
                credentials,
            )?;
            let status = response.status().as_u16();
            if status == 401 && self.token.is_none() {
                let challenge = response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.token = Some(self.anonymous_token(&challenge)?);
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(Error::Registry(format!("GET {url}: HTTP {status}")));
            }
            return Ok(Box::new(response.into_body().into_reader()));
        }
        Err(Error::Registry(format!(
            "GET {url}: unauthorized with an anonymous token"
        )))
    }

    fn anonymous_token(&self, challenge: &str) -> Result<String> {
        let params = challenge
            .strip_prefix("Bearer ")
            .ok_or_else(|| Error::Registry(format!("unsupported authentication challenge {challenge:?}")))?;
        let param = |name: &str| {
            params.split(',').find_map(|p| {
                let (key, value) = p.trim().split_once('=')?;
                (key == name).then(|| value.trim_matches('"').to_string())
            })
        };
        let realm = param("realm").ok_or_else(|| Error::Registry("Bearer challenge without realm".into()))?;
        let mut url = format!("{realm}?scope=repository:{}:pull", self.reference.repository);
        if let Some(service) = param("service") {
            url.push_str(&format!("&service={service}"));
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        // The realm is the registry's to name, so it is checked like any other destination.
        let response = net::get(&self.client.agent, &self.client.policy, &url, &[], None)?;
        if !response.status().is_success() {
            return Err(Error::Registry(format!(
                "GET {realm}: HTTP {}",
                response.status()
            )));
        }
        let token: Token = response
            .into_body()
            .read_json()
            .map_err(|e| Error::Registry(format!("GET {realm}: {e}")))?;
        Ok(if token.token.is_empty() {
            token.access_token
        } else {
            token.token
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_container_tools() {
        let r = Reference::parse("ghcr.io/ironcore-dev/os-images/gardenlinux:1877.0").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("ghcr.io", "ironcore-dev/os-images/gardenlinux", "1877.0")
        );
        let r = Reference::parse("localhost:5000/os").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.reference.as_str()),
            ("localhost:5000", "latest")
        );
        assert_eq!(r.base_url(&[]), "http://localhost:5000");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("debian:12@{digest}")).unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.reference, digest);
        assert_eq!(r.base_url(&[]), "https://registry-1.docker.io");
        let r = Reference::parse("registry.internal:5000/os:1").unwrap();
        assert_eq!(
            r.base_url(&["registry.internal:5000".into()]),
            "http://registry.internal:5000"
        );
        assert_eq!(r.base_url(&[]), "https://registry.internal:5000");
        for bad in ["", "http://x/y", "Upper/Case", "x@sha256:12", "a b", "x@md5:00"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
