//! Bearer-token authentication: who is calling (a user, an admin, a worker, or a worker
//! holding the join token), decided from the `Authorization` header alone.
//!
//! Tokens are kept only as SHA-256 hashes and compared in constant time.
//!
//! * **User and admin tokens** come from a tokens file (see [`load_tokens_file`]). A user's
//!   `user_id` is the one its token maps to: request bodies never say who the user is.
//! * **The join token** (its hash given to [`Authenticator::new`]) lets a worker register.
//! * **Worker tokens** are issued at registration and shown once. They are self-locating,
//!   `cai_w_<worker_id>.<secret>`, so that authentication reads that one worker and compares
//!   the hash stored in `Worker.token_sha256`.
//!
//! # Tokens file
//!
//! ```json
//! {"tokens": [
//!   {"user_id": "alice", "role": "user",  "token_sha256": "<64 hex digits>"},
//!   {"user_id": "ops",   "role": "admin", "token": "<plaintext, hashed on load>"}
//! ]}
//! ```
//!
//! Each entry has `user_id`, `role` (`user` or `admin`) and exactly one of `token_sha256`
//! or `token`. Unknown fields, duplicate `user_id`s and duplicate tokens are refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::validate_id;
use crate::store::StoreError;

/// Prefix of user and admin tokens made by [`generate_token`] callers.
pub const USER_TOKEN_PREFIX: &str = "cai_u_";
/// Prefix of worker tokens; the worker id and a `.` follow it.
pub const WORKER_TOKEN_PREFIX: &str = "cai_w_";
/// Prefix of join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "cai_j_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees and manages only its own tasks.
    User,
    /// Sees every task, manages workers and policies.
    Admin,
}

/// One user or admin token, by hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub user_id: String,
    pub role: Role,
    /// SHA-256 of the token, lowercase hex.
    pub token_sha256: String,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    User {
        user_id: String,
        role: Role,
    },
    Worker {
        worker_id: String,
    },
    /// Holder of the join token: may only register a worker.
    Join,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Principal::User {
                role: Role::Admin,
                ..
            }
        )
    }

    /// A user or an admin (not a worker, not the join token): `(user_id, is_admin)`.
    pub fn require_user(&self) -> Result<(&str, bool), ApiError> {
        match self {
            Principal::User { user_id, role } => Ok((user_id, *role == Role::Admin)),
            Principal::Worker { .. } | Principal::Join => Err(ApiError::forbidden(
                "this endpoint needs a user or admin token",
            )),
        }
    }

    pub fn require_admin(&self) -> Result<&str, ApiError> {
        match self {
            Principal::User {
                user_id,
                role: Role::Admin,
            } => Ok(user_id),
            _ => Err(ApiError::forbidden("this endpoint needs an admin token")),
        }
    }
}

/// Checks bearer tokens against the configured user/admin hashes, the join token's hash and
/// the workers' stored hashes.
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Vec<TokenEntry>,
    join_token_sha256: Option<String>,
}

impl Authenticator {
    pub fn new(tokens: Vec<TokenEntry>, join_token_sha256: Option<String>) -> Self {
        let tokens = tokens
            .into_iter()
            .map(|t| TokenEntry {
                token_sha256: t.token_sha256.to_ascii_lowercase(),
                ..t
            })
            .collect();
        Authenticator {
            tokens,
            join_token_sha256: join_token_sha256.map(|h| h.to_ascii_lowercase()),
        }
    }

    /// Decides who sent `headers`: 401 `unauthorized` when the token is missing, malformed
    /// or unknown.
    pub async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
        store: &dyn crate::store::Store,
    ) -> Result<Principal, ApiError> {
        let token = bearer_token(headers)?;
        let hash = token_sha256_hex(token);

        // Every configured entry is compared, so the time taken does not tell which matched.
        let mut found: Option<&TokenEntry> = None;
        for entry in &self.tokens {
            if constant_time_eq(entry.token_sha256.as_bytes(), hash.as_bytes()) {
                found = Some(entry);
            }
        }
        if let Some(entry) = found {
            return Ok(Principal::User {
                user_id: entry.user_id.clone(),
                role: entry.role,
            });
        }
        if let Some(join) = &self.join_token_sha256
            && constant_time_eq(join.as_bytes(), hash.as_bytes())
        {
            return Ok(Principal::Join);
        }
        if let Some(worker_id) = worker_id_of_token(token) {
            match store.get_worker(worker_id).await {
                Ok(worker) => {
                    if constant_time_eq(
                        worker.token_sha256.to_ascii_lowercase().as_bytes(),
                        hash.as_bytes(),
                    ) {
                        return Ok(Principal::Worker {
                            worker_id: worker.worker_id,
                        });
                    }
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(other) => return Err(other.into()),
            }
        }
        Err(ApiError::unauthorized("unknown or revoked token"))
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state
            .auth
            .authenticate(&parts.headers, state.store.as_ref())
            .await
    }
}

fn bearer_token(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <token>"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(ApiError::unauthorized(
            "expected Authorization: Bearer <token>",
        ));
    }
    Ok(token)
}

/// The worker id inside a `cai_w_<worker_id>.<secret>` token, when it has that shape.
fn worker_id_of_token(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(WORKER_TOKEN_PREFIX)?;
    // Worker ids may contain '.', the secret (hex) never does.
    let (worker_id, secret) = rest.rsplit_once('.')?;
    (!secret.is_empty() && validate_id(worker_id).is_ok()).then_some(worker_id)
}

/// A new worker token for `worker_id`: `cai_w_<worker_id>.<64 hex digits>`.
pub fn generate_worker_token(worker_id: &str) -> String {
    generate_token(&format!("{WORKER_TOKEN_PREFIX}{worker_id}."))
}

/// SHA-256 of `token`, lowercase hex.
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `prefix` followed by 32 random bytes in lowercase hex (256 bits from the OS-seeded
/// thread RNG), e.g. `generate_token("cai_u_")`.
pub fn generate_token(prefix: &str) -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{prefix}{}", hex::encode(secret))
}

/// Equality whose running time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokens file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tokens file {path}: entry {index} ({user_id}): {reason}")]
    Invalid {
        path: PathBuf,
        index: usize,
        user_id: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokensFileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFileEntry {
    user_id: String,
    role: Role,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// Reads a tokens file (format in the module docs), hashing plaintext tokens.
pub fn load_tokens_file(path: &Path) -> Result<Vec<TokenEntry>, TokensFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: TokensFile =
        serde_json::from_str(&text).map_err(|source| TokensFileError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    let mut users = HashSet::new();
    let mut hashes = HashSet::new();
    let mut out = Vec::with_capacity(file.tokens.len());
    for (index, entry) in file.tokens.into_iter().enumerate() {
        let invalid = |reason: String| TokensFileError::Invalid {
            path: path.to_path_buf(),
            index,
            user_id: entry.user_id.clone(),
            reason,
        };
        if let Err(why) = validate_id(&entry.user_id) {
            return Err(invalid(format!("invalid user_id: {why}")));
        }
        let hash = match (&entry.token_sha256, &entry.token) {
            (Some(hash), None) => {
                let hash = hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid("token_sha256 must be 64 hex digits".into()));
                }
                hash
            }
            (None, Some(token)) => {
                if token.len() < 16 || token.chars().any(|c| c.is_whitespace()) {
                    return Err(invalid(
                        "token must be at least 16 characters, without whitespace".into(),
                    ));
                }
                token_sha256_hex(token)
            }
            _ => {
                return Err(invalid("give exactly one of token_sha256 or token".into()));
            }
        };
        if !users.insert(entry.user_id.clone()) {
            return Err(invalid("duplicate user_id".into()));
        }
        if !hashes.insert(hash.clone()) {
            return Err(invalid(
                "duplicate token (the same token is given to another entry)".into(),
            ));
        }
        out.push(TokenEntry {
            user_id: entry.user_id,
            role: entry.role,
            token_sha256: hash,
        });
    }
    Ok(out)
}

/// Reads a task the caller may see: 404 when absent, 403 when another user's.
pub(crate) async fn visible_task(
    state: &AppState,
    principal: &Principal,
    task_id: &str,
) -> ApiResult<crate::model::Task> {
    let (user_id, is_admin) = principal.require_user()?;
    let task = state.store.get_task(task_id).await?;
    if !is_admin && task.user_id != user_id {
        return Err(ApiError::forbidden(format!(
            "task {task_id} belongs to another user"
        )));
    }
    Ok(task)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn tokens_file_loads_hashes_and_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let hash = token_sha256_hex("cai_u_alice_secret_token");
        let path = write(
            &dir,
            &format!(
                r#"{{"tokens":[{{"user_id":"alice","role":"user","token_sha256":"{}"}},
                   {{"user_id":"ops","role":"admin","token":"cai_u_ops_secret_token"}}]}}"#,
                hash.to_uppercase()
            ),
        );
        let tokens = load_tokens_file(&path).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].token_sha256, hash);
        assert_eq!(tokens[1].role, Role::Admin);
        assert_eq!(
            tokens[1].token_sha256,
            token_sha256_hex("cai_u_ops_secret_token")
        );
    }

    #[test]
    fn tokens_file_refuses_duplicates_and_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let dup_user = write(
            &dir,
            r#"{"tokens":[{"user_id":"a","role":"user","token":"0123456789abcdef0"},
                         {"user_id":"a","role":"user","token":"0123456789abcdef1"}]}"#,
        );
        let err = load_tokens_file(&dup_user).unwrap_err().to_string();
        assert!(err.contains("duplicate user_id"), "{err}");
        let dup_token = write(
            &dir,
            r#"{"tokens":[{"user_id":"a","role":"user","token":"0123456789abcdef0"},
                         {"user_id":"b","role":"user","token":"0123456789abcdef0"}]}"#,
        );
        let err = load_tokens_file(&dup_token).unwrap_err().to_string();
        assert!(err.contains("duplicate token"), "{err}");
        let unknown = write(
            &dir,
            r#"{"tokens":[{"user_id":"a","role":"user","token":"0123456789abcdef0","x":1}]}"#,
        );
        assert!(matches!(
            load_tokens_file(&unknown),
            Err(TokensFileError::Parse { .. })
        ));
        let both = write(&dir, r#"{"tokens":[{"user_id":"a","role":"user"}]}"#);
        assert!(matches!(
            load_tokens_file(&both),
            Err(TokensFileError::Invalid { .. })
        ));
        let role = write(
            &dir,
            r#"{"tokens":[{"user_id":"a","role":"root","token":"0123456789abcdef0"}]}"#,
        );
        assert!(load_tokens_file(&role).is_err());
    }

    #[test]
    fn tokens_are_random_and_worker_tokens_locate_their_worker() {
        let a = generate_token(USER_TOKEN_PREFIX);
        let b = generate_token(USER_TOKEN_PREFIX);
        assert_ne!(a, b);
        assert_eq!(a.len(), USER_TOKEN_PREFIX.len() + 64);
        let w = generate_worker_token("worker.1");
        assert_eq!(worker_id_of_token(&w), Some("worker.1"));
        assert_eq!(worker_id_of_token("cai_w_nodot"), None);
        assert_eq!(worker_id_of_token("cai_w_bad/id.abc"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
