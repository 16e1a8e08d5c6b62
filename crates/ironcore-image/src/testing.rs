// SPDX-License-Identifier: Apache-2.0
//! For tests of this crate and of providers: a real registry (Debian's `docker-registry`, the
//! CNCF distribution server) on a loopback port, and a minimal pusher of IronCore images.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use crate::{MEDIA_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};

/// A running `docker-registry`; killed when dropped.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub address: String,
    agent: ureq::Agent,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer to push: media type suffix after `application/vnd.ironcore.image.` (or a full media
/// type containing a `/`) and content.
pub struct Layer<'a> {
    /// e.g. `rootfs`.
    pub kind: &'a str,
    /// The bytes.
    pub content: &'a [u8],
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", super::hex(&Sha256::digest(bytes)))
}

impl Registry {
    /// Starts `docker-registry` storing under `dir` (install Debian's `docker-registry`).
    pub fn start(dir: &Path) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                dir.join("storage").display()
            ),
        )
        .expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry (apt-get install docker-registry)");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let registry = Registry {
            child,
            address,
            agent,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while registry
            .agent
            .get(&format!("http://{}/v2/", registry.address))
            .call()
            .map_or(true, |r| r.status().as_u16() != 200)
        {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start on {}",
                registry.address
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn push_blob(&self, repository: &str, content: &[u8]) -> String {
        let digest = digest(content);
        let base = format!("http://{}", self.address);
        let started = self
            .agent
            .post(&format!("{base}/v2/{repository}/blobs/uploads/"))
            .send_empty()
            .expect("start upload");
        assert_eq!(started.status().as_u16(), 202, "start upload");
        let location = started.headers()["location"].to_str().unwrap().to_string();
        let location = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let done = self
            .agent
            .put(&format!("{location}{separator}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .send(content)
            .expect("upload");
        assert_eq!(done.status().as_u16(), 201, "upload blob");
        digest
    }

    fn put_manifest(&self, repository: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let response = self
            .agent
            .put(&format!(
                "http://{}/v2/{repository}/manifests/{tag}",
                self.address
            ))
            .header("Content-Type", media_type)
            .send(body)
            .expect("put manifest");
        assert_eq!(response.status().as_u16(), 201, "put manifest");
        digest(body)
    }

    /// Pushes an IronCore image with `layers` as `repository:tag`; returns the manifest digest.
    pub fn push(&self, repository: &str, tag: &str, layers: &[Layer<'_>]) -> String {
        let config = br#"{"commandLine":"console=ttyS0"}"#;
        let config_digest = self.push_blob(repository, config);
        let layers: Vec<serde_json::Value> = layers
            .iter()
            .map(|layer| {
                let media_type = if layer.kind.contains('/') {
                    layer.kind.to_string()
                } else {
                    format!("application/vnd.ironcore.image.{}", layer.kind)
                };
                serde_json::json!({
                    "mediaType": media_type,
                    "digest": self.push_blob(repository, layer.content),
                    "size": layer.content.len(),
                })
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layers,
        });
        self.put_manifest(
            repository,
            tag,
            MEDIA_OCI_MANIFEST,
            &serde_json::to_vec(&manifest).unwrap(),
        )
    }

    /// Pushes an index naming manifest `digest` (of `size` bytes) for linux/`architecture`.
    pub fn push_index(
        &self,
        repository: &str,
        tag: &str,
        digest: &str,
        size: usize,
        architecture: &str,
    ) -> String {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [{
                "mediaType": MEDIA_OCI_MANIFEST, "digest": digest, "size": size,
                "platform": {"architecture": architecture, "os": "linux"},
            }],
        });
        self.put_manifest(
            repository,
            tag,
            MEDIA_OCI_INDEX,
            &serde_json::to_vec(&index).unwrap(),
        )
    }

    /// The size of the manifest with `digest` in `repository`.
    pub fn manifest_size(&self, repository: &str, digest: &str) -> usize {
        let response = self
            .agent
            .get(&format!(
                "http://{}/v2/{repository}/manifests/{digest}",
                self.address
            ))
            .header("Accept", MEDIA_OCI_MANIFEST)
            .call()
            .expect("get manifest");
        response.into_body().read_to_vec().expect("manifest body").len()
    }
}
