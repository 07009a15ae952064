//! The worker's identity on its host (id and token), kept in its state directory so that a
//! restarted agent is the same worker, not a new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

const FILE: &str = "identity.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// The host this identity was issued by.
    pub host: String,
    pub worker_id: String,
    /// The worker's own bearer token (shown once by the host at registration).
    pub token: String,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The saved identity, if any; an unreadable file is an error (never silently a new worker).
pub fn load(state_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let path = path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("reading the worker identity {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Saves the identity readable by this user only, replacing the file atomically.
pub fn save(state_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(serde_json::to_string_pretty(identity)?.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path(state_dir))
        .with_context(|| format!("saving the worker identity in {}", state_dir.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_identity_survives_a_restart_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert_eq!(load(&state).unwrap(), None);
        let id = Identity {
            host: "http://127.0.0.1:8080".into(),
            worker_id: "w1".into(),
            token: "cai_w_secret".into(),
        };
        save(&state, &id).unwrap();
        assert_eq!(load(&state).unwrap(), Some(id));
        let mode = std::fs::metadata(path(&state))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(path(&state), "{not json").unwrap();
        assert!(load(&state).is_err(), "a corrupt identity is an error");
    }
}
